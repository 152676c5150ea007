"""The training state files of a run: the newest at --state-file, up to --keep-states - 1
older ones beside it (mlm_state.pt.1 the one before it, mlm_state.pt.2, ...), each written
atomically; which one --checkpoint auto resumes from; and whether their run finished.

    StateFiles(config, ...).save(parts) # every rank, at every state write (trainer.Trainer)
    save(state, path, keep, continues)  # rank 0: the file written, the older ones kept
    mark_finished(path)                 # rank 0, once every end-of-run output is written
    resumable(path)                     # --checkpoint auto: the newest state that loads
    check_replaceable(path, resumes)    # no run replaces an unfinished run's states
    same_run(state, flags, given)       # a resume: the command names the state's run
    restore(ckpt, path, model, ...)     # a resume: every part of the run from its state

A state file of a finished run holds "finished": True. Such a run is done: --checkpoint auto
exits at once, and a new run without --checkpoint may replace its states. An unfinished
run's states are never replaced by a run that did not resume from them. A state records
the run it is of: its script ("script"), its task ("task": the GLUE task, the SQuAD
version), its data and architecture (its flags, "args", and its model's "config"); it is
resumed, or found finished, only by a command of the same run (same_run).
"""

import os
import re

import torch
import torch.distributed as dist

import utils
from bertkit import checkpoint
from bertkit.files import UserError, atomic_save, load_torch


def older(path, n):
    """The path of the n-th state before the newest: mlm_state.pt.1, ..."""
    return f"{path}.{n}"


def family(path):
    """[(n, path)] of the state files there are at `path`: the newest (n = 0) and the older
    ones beside it (path.n), newest first."""
    folder = os.path.dirname(path) or "."
    name = re.escape(os.path.basename(path))
    found = [(0, path)] if os.path.isfile(path) else []
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            match = re.fullmatch(rf"{name}\.(\d+)", entry)
            if match and int(match[1]) > 0:
                found.append((int(match[1]), older(path, int(match[1]))))
    return sorted(found)


def slot(checkpoint, path):
    """Which of the state files at `path` a run resuming `checkpoint` continues (0: the
    newest, n: path.n), or None: a new run, or one resumed from a file elsewhere."""
    if checkpoint is None:
        return None
    real = os.path.realpath(checkpoint)
    return next((n for n, p in family(path) if os.path.realpath(p) == real), None)


def save(state, path, keep, continues):
    """Write `state` to `path` atomically, keeping the newest `keep` state files in all.

    `continues`: the slot (above) of the state file this run continues, or None for a new
    run. The states of its own run move one place older (path -> path.1 -> path.2 ...)
    and the oldest beyond `keep` are removed; those of an earlier run, and those newer
    than the state it resumed (they did not load), are removed. The moves happen only
    once the new file is complete: a crash at any point leaves the new state or the one
    before it for --checkpoint auto."""
    def make_room():
        found = [(n, p) for n, p in family(path) if n > 0]
        kept = [p for n, p in found if continues is not None and n >= continues]
        targets = [older(path, n) for n in range(1, keep)]
        if continues == 0 and os.path.isfile(path):
            kept.insert(0, path)
        for p in [p for n, p in found if p not in kept] + kept[len(targets):]:
            if p != path:  # the newest is replaced by the new state
                os.remove(p)
        moves = list(zip(kept, targets))
        # Moving up (path -> path.1) starts with the oldest; moving down (after a fallback
        # to path.2, say) with the newest: no move replaces a file still to be moved.
        for source, target in reversed(moves) if continues == 0 else moves:
            if source != target:
                os.replace(source, target)

    atomic_save(state, path, before_replace=make_room)


def mark_finished(path):
    """Record in the state at `path` that its run finished, every output written: the
    same state, rewritten atomically with "finished": True."""
    state = load_torch(path, mmap=True)
    state["finished"] = True
    atomic_save(state, path)


def read(path):
    """(the state file at `path`, loaded with its tensors mapped from disk, or None, why it
    does not load). A file that loads but is not a training state is an error."""
    try:
        state = load_torch(path, mmap=True)
    except Exception as e:  # torch raises many kinds for a truncated or damaged file
        return None, f"truncated or damaged: {type(e).__name__}"
    if not isinstance(state, dict) or state.get("kind") != "state":
        raise UserError(f"--state-file {path}: holds no training state (it is not a state "
                        "file of this project); give another --state-file, or move it away")
    return state, None


def step_of(state):
    train_state = state.get("train_state")
    return train_state.get("global_step", "?") if isinstance(train_state, dict) else "?"


def resumable(path):
    """For --checkpoint auto: (the state file to resume from, its state, notes to print),
    or (None, None, notes) when there is none yet: a new run. The newest state that loads
    is taken; states that do not load (truncated or damaged by a dying node's filesystem)
    are passed over, and the notes say so. None loading at all is an error."""
    if os.path.isdir(path):
        raise UserError(f"--state-file {path}: is a folder; --checkpoint auto resumes from "
                        "the state file of that name, give a file name")
    found = family(path)
    if not found:
        return None, None, [f"--checkpoint auto: no state file at {path}: starting a new run"]
    failed = []
    for _, candidate in found:
        state, problem = read(candidate)
        if state is None:
            failed.append(f"{candidate} ({problem})")
            continue
        notes = [f"--checkpoint auto: {'; '.join(failed)} did not load: resuming from the "
                 f"state before, {candidate} (step {step_of(state)})"] if failed else []
        return candidate, state, notes
    raise UserError(f"--checkpoint auto: no state file at {path} loads: {'; '.join(failed)}; "
                    "remove them to start a new run")


def check_replaceable(path, resumes):
    """A run that writes its states to `path` without resuming one of them (`resumes`: the
    state file it resumes, or None) refuses when an unfinished run's states are there:
    that run's work would be lost. A finished run's states may be replaced."""
    found = family(path)
    if not found or slot(resumes, path) is not None:
        return
    state, _ = read(path) if found[0][0] == 0 else (None, None)
    if state is not None and state.get("finished") is True:
        return
    where = f"{path} holds the state of an unfinished run (step {step_of(state)})" if state \
        else f"{', '.join(p for _, p in found)}: the states of an unfinished run"
    raise UserError(f"--state-file {where}: resume it with --checkpoint auto, or start a new "
                    f"run with another --state-file (or remove {path} and the states beside "
                    "it)")


# The flags that say which run a state is of, besides its script: its task, its data, and
# its architecture (the model it starts from; its sizes, compared with the state's model).
RUN_FLAGS = {
    "task": ("task",),
    "data": ("dataset", "train_file", "dev_file", "text_columns", "label_column",
             "regression", "tokenizer", "vocab_size", "min_freq"),
    "architecture": ("bert_model", "from_scratch", "size", "emsize", "nhid", "nlayers",
                     "nhead", "qa_gelu", "next_sentence"),
}
SIZES = ("emsize", "nhid", "nlayers", "nhead")  # compared with the state's model config


# What a run's flags hold besides the flags (saved in its state file with them).
NOT_FLAGS = {"script", "run_id", "explicit_outputs", "given_flags", "given_batch_flags",
             "global_batch", "default_log_interval", "launched_at"}


def check_same_run(state, script, flag_names, flags, given, path, auto=False):
    """A state file (found by --checkpoint auto, or --checkpoint `path`) that a command of
    `script` may resume: one of that script (one without its name: with no flag the script
    lacks, `flag_names`), and of the run the command names (same_run); else a UserError."""
    where = f"--checkpoint auto: {path}" if auto else f"--checkpoint {path}"
    saved = state.get("script") or state["args"].get("script")
    foreign = sorted(set(state["args"]) - set(flag_names) - NOT_FLAGS)
    if (saved and saved != script) or (not saved and foreign):
        raise UserError(f"{where}: " + (
            f"a state file of {saved}; resume it with python {saved} --checkpoint {path}"
            if saved else f"a state file of another script (with its flags "
                          f"{', '.join('--' + f for f in foreign[:3])})"))
    differences = same_run(state, flags, given)
    if differences:
        hint = ("give this run another --output-dir or --state-file (or remove "
                f"{path} and the states beside it)") if auto else (
            "a resumed run keeps them: leave those flags out")
        raise UserError(f"{where}: the state of another run ({differences}); {hint}")


def same_run(state, flags, given):
    """The differences, as text ("--task RTE, not CoLA"), between the run of state file
    `state` and the run a command names: each flag of RUN_FLAGS `given` on its command line
    (`flags`: its values) against the state's (the model's own sizes for SIZES). "" when
    it names the state's run: flags left out take the state's, as a resume does."""
    saved, config = state.get("args") or {}, state.get("config") or {}
    differences = []
    for name in [name for names in RUN_FLAGS.values() for name in names]:
        if name not in given or name not in flags:
            continue
        theirs = config.get(name) if name in SIZES else saved.get(name)
        if not _same_value(theirs, flags[name], name == "task"):
            differences.append(f"--{name.replace('_', '-')} {_shown(theirs)}, not "
                               f"{_shown(flags[name])}")
    text = "; ".join(differences)
    return f"{state['task']}: {text}" if text and isinstance(state.get("task"), str) else text


def _same_value(saved, given, task=False):
    if isinstance(saved, list | tuple) and isinstance(given, list | tuple):
        return len(saved) == len(given) and all(map(_same_value, saved, given))
    if isinstance(saved, str) and isinstance(given, str):
        if task:  # GLUE's spelling or transformers' (RTE, rte; SST-2, sst2)
            return saved.lower().replace("-", "").replace("_", "") == \
                given.lower().replace("-", "").replace("_", "")
        return saved == given or os.path.realpath(saved) == os.path.realpath(given)
    return saved == given


def _shown(value):
    if value is None:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def restore(ckpt, path, model, optimizer, scheduler, scaler, config, rank, device):
    """Load state file `ckpt` (read from `path`, the resolved --checkpoint) into the model,
    optimizer, scheduler and scaler, and this rank's random streams; returns its training
    state (checkpoint.check_fields checked its types). One-line errors for a file that is
    no state, or whose optimizer does not fit the run's flags."""
    if ckpt.get("kind") != "state":
        raise UserError(f"--checkpoint {path}: not a state file")
    missing = {"optimizer", "scheduler", "scaler", "train_state", "rng"} - ckpt.keys()
    if missing:
        raise UserError(f"--checkpoint {path}: a state file without {', '.join(sorted(missing))}")
    checkpoint.load_into(model, ckpt["model"], "--checkpoint", path)
    for flag, old_default in (("optimizer", "sgd"), ("schedule", "plateau")):
        saved = ckpt.get("args", {}).get(flag, old_default)  # a dict: checkpoint.check_fields
        if saved != getattr(config, flag):
            raise UserError(f"--checkpoint {path} was saved with --{flag} {saved}: its state "
                            f"cannot continue under --{flag} {getattr(config, flag)}")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # A state saved without fp16 has no scaler state: a fresh scaler starts the run.
        if ckpt["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, KeyError) as e:  # e.g. --weight-decay 0 <-> not 0: other groups
        raise UserError(f"--checkpoint {path}: its optimizer state does not fit --weight-decay "
                        f"{config.weight_decay} ({e})") from None
    except (TypeError, AttributeError, IndexError, RuntimeError) as e:  # a damaged file
        raise UserError(f"--checkpoint {path}: its optimizer, scheduler or scaler state is "
                        f"unusable ({type(e).__name__})") from None
    rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if rank < len(rng):
        try:
            utils.set_rng_state(rng[rank], device)
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--checkpoint {path}: its random number generator state is "
                            f"unusable ({type(e).__name__})") from None
    else:  # more ranks than the run that saved: the new ones start fresh streams
        torch.manual_seed(config.seed + rank)
    return ckpt["train_state"]


class StateFiles:
    """The state files of one run (config: its TrainConfig): written at --state-file,
    --keep-states of them kept (save); which of them the run continues (slot); and what
    each holds besides the training's own parts: the run's `flags` (a resume needs none
    repeated), its vocabulary and tokenizer, its `task` (the GLUE task, the SQuAD version;
    check_same_run compares it) and every rank's random streams."""

    def __init__(self, config, info, device, flags, vocab, task=None):
        self.path, self.keep, self.info, self.device = (config.state_file, config.keep_states,
                                                        info, device)
        self.flags = flags
        # What every state file holds besides the training state and the config, built once.
        self.extra = {"vocab": vocab.itos, "tokenizer": vocab.state(), "task": task}
        # Which of the state files at --state-file this run continues (save).
        self.continues = slot(config.checkpoint, config.state_file)
        self.written = False

    def save(self, parts, best_model, metrics_rows):
        """A state file of `parts` (model, config, optimizer, scheduler, scaler,
        train_state); every rank calls this (each rank's random streams are gathered), rank
        0 writes it. `best_model`: the task's best_model_path; `metrics_rows`: the metrics
        log's length, which a resume keeps."""
        rng = [utils.rng_state(self.device)]
        if self.info.enabled:  # each rank's own RNG, so that a resume restores every rank's
            rng = [None] * self.info.world_size
            dist.all_gather_object(rng, utils.rng_state(self.device))
        if self.info.is_main:
            save({
                "kind": "state", **parts, "rng": rng, "args": self.flags, **self.extra,
                # What to give a script that wants a model (checkpoint.refuse_state_file).
                "best_model": best_model,
                # Which script, and task, may resume it (flags.check_resumable).
                "script": self.flags.get("script"),
                "metrics_rows": metrics_rows,  # the log's rows a resume keeps
            }, self.path, self.keep, self.continues)
            self.written = True
        self.continues = 0

    def files(self):
        """The state file, as 'path (what)', once written."""
        return [f"{self.path} (training state)"] if self.written else []

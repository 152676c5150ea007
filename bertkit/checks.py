"""Path checks made before any work: every input exists, every output can be written and
overwrites no input, no other output and no model another run wrote; then a lock on every
output for the whole run, so that bad input costs one line and nothing on disk is lost.
(Flag values: bertkit/flags.py.)

Each script knows the files a run writes in one place, its `outputs(args, ...)`: {flag:
(path, what)}, with the Trainer's own added (run_outputs). The same dict is checked
and locked here (prepare_run) and read by the writers, so that no path is decided after
the check. Every problem is a files.UserError: one line `error: ...`, exit code 2.
"""

import atexit
import contextlib
import errno
import os
import tempfile
from pathlib import Path

from bertkit.files import UserError, load_torch
from bertkit.training import states

try:
    import fcntl  # POSIX: output locks; elsewhere runs go unlocked
except ImportError:
    fcntl = None


# The commands that write the scripts' default checkpoints, for "no such file" errors (a
# script may name its own: prepare_run's made_by).
MADE_BY = {
    "mlm_bert.pt": "python mlm_task.py", "full_mlm_model.pt": "python mlm_task.py",
    "ns_bert.pt": "python ns_task.py --bert-model mlm_bert.pt",
    "ns_model.pt": "python ns_task.py --bert-model mlm_bert.pt",
    "qa_model.pt": "python qa_task.py --bert-model ns_bert.pt",
    "glue_model.pt": "python glue_task.py --bert-model ns_bert.pt --task RTE",
}


def check_inputs(inputs, made_by=None):
    """{flag: path} of files a run reads: each must exist (a file, or a folder where the
    flag takes one: a transformers model folder). `made_by`: {file name: command} that
    writes it, beside MADE_BY, for the error."""
    for flag, path in inputs.items():
        if path is not None and not os.path.exists(path):
            command = {**MADE_BY, **(made_by or {})}.get(os.path.basename(path))
            raise UserError(f"{flag} {path}: no such file"
                            + (f" ({command} writes it)" if command else ""))


def paths(outputs):
    """{flag: path} of a run's outputs given as {flag: (path, what)} (or {flag: path})."""
    return {flag: value[0] if isinstance(value, tuple) else value
            for flag, value in outputs.items()}


# Outputs that are folders (TensorBoard's events): checked and locked as the files are,
# but may exist as a folder.
FOLDER_OUTPUTS = ("--tensorboard",)


def prepare_run(info, inputs, outputs, data_dir=None, also_read=None, owner=None,
                made_by=None):
    """Every path check of a run, before any work; then, on rank 0 (the rank that writes),
    the lock on its outputs, held until the process ends. `outputs`: the script's one
    {flag: (path, what)} of every file the run writes, which its writers then use.
    `also_read`: {what: path} of inputs that may not exist yet (downloads) or that no flag
    names alone (a dataset's files, its token cache: corpus.dataset_inputs), only kept
    apart from the outputs. An input that is a folder keeps every output out of it.
    `owner`: who may replace a model file already at an output (Owner; default: nobody)."""
    check_inputs(inputs, made_by)
    if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: is a file, not a folder")
    outputs = paths(outputs)
    check_outputs(outputs, {**(also_read or {}),
                            **{flag: path for flag, path in inputs.items() if path is not None}})
    check_models_kept(outputs, owner or Owner())
    global _held
    release_outputs()  # a process runs one training at a time: an earlier one's (tests)
    _held = OutputLock(outputs.values()) if info.is_main else None
    return _held


_held = None  # the OutputLock of this process's run


def release_outputs():
    """Give up this process's output locks (at exit, or before its next run)."""
    global _held
    if _held is not None:
        _held.release()
        _held = None


def run_outputs(task_outputs, config):
    """{flag or description: (path, what)} of every file a run writes: the task's and the
    Trainer's own (the older states --keep-states keeps too; with --evaluate-only the
    metrics log alone); for the path checks before the run (prepare_run) and the
    "wrote" line after it. The state a run resumes (--checkpoint) may be one of its own
    states, never another output; a run replaces no unfinished run's states
    (states.check_replaceable)."""
    metrics = {"--metrics-file": (config.metrics_file, "metrics")}
    if config.tensorboard:
        metrics["--tensorboard"] = (config.tensorboard, "TensorBoard events")
    if config.evaluate_only:
        return metrics
    states.check_replaceable(config.state_file, config.checkpoint)
    older = {f"--keep-states {config.keep_states} (older state {n})":
             (states.older(config.state_file, n), "older training state")
             for n in range(1, config.keep_states)}
    outputs = {**task_outputs, "--state-file": (config.state_file, "training state"), **older,
               **metrics}
    if config.checkpoint is not None:
        resumed = os.path.realpath(config.checkpoint)
        for flag, (path, _) in outputs.items():
            if (path is not None and os.path.realpath(path) == resumed
                    and states.slot(config.checkpoint, config.state_file) is None):
                raise UserError(f"{flag} {path} is also --checkpoint: writing it would "
                                "overwrite the state this run resumes")
    return outputs


def check_outputs(outputs, inputs):
    """{flag: path} of the files a run writes, against {flag: path} of those it reads:
    no output is a folder, lies under a file, is unwritable, is an input or inside an
    input folder, or is another output. Probes each output's folder with a file made and
    removed."""
    seen = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        for other_flag, other in inputs.items():
            if other is None:
                continue
            if os.path.realpath(other) == real:
                raise UserError(f"{flag} {path} is also {other_flag}: writing it would "
                                "overwrite that input")
            if Path(os.path.realpath(other)) in Path(real).parents:
                raise UserError(f"{flag} {path} is inside {other} ({other_flag}): writing it "
                                "would change that input; give it another folder")
        if real in seen:
            raise UserError(f"{flag} {path} is also {seen[real]}: two outputs in one file")
        seen[real] = flag
        if flag in FOLDER_OUTPUTS:
            if os.path.exists(path) and not os.path.isdir(path):
                raise UserError(f"{flag} {path}: is a file; give a folder")
        elif os.path.isdir(path):
            raise UserError(f"{flag} {path}: is a folder; give a file name")
        _probe_folder(flag, path)


def check_folder_output(flag, folder, inputs):
    """A folder a command writes whole and may replace (convert.py's OUT_DIR --force), against
    {flag: path} of what it reads: it is no input and holds none (a folder beside an input
    folder's files, inside it, replaces none of them)."""
    real = Path(os.path.realpath(folder))
    for other_flag, other in inputs.items():
        other_real = Path(os.path.realpath(other))
        if other_real == real or real in other_real.parents:
            raise UserError(f"{flag} {folder} holds {other_flag} {other}: writing {folder} would "
                            f"replace that input; give another {flag}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag} {folder} is a file, not a folder")
    _probe_folder(flag, folder)


###############################################################################
# Models another run wrote
###############################################################################

# A model file records the run that wrote it (run_record, saved as its "run"): a run
# replaces a model only where it wrote it itself (the same run, resumed), where the same
# command wrote it (the same settings), or with --overwrite.
MODEL_KINDS = ("encoder", "mlm", "ns", "qa", "glue")
# The flags that do not change what a run trains: where its files go, how it is launched,
# logged and resumed, what it predicts. Every other flag (a new one too) is a setting.
NOT_SETTINGS = {
    "run_id", "checkpoint", "output_dir", "save", "save_vocab", "state_file", "metrics_file",
    "predictions", "test_predictions", "na_probs", "tensorboard", "keep_states",
    "slurm_requeue", "no_progress", "log_interval", "default_log_interval", "save_every",
    "num_workers", "world_size", "parallel", "device", "compile", "data_dir", "overwrite",
    "launched_at", "explicit_outputs", "given_flags", "given_batch_flags", "test_file",
    "predict", "model", "qa_model", "sentence", "sentence2", "context", "question",
    "predict_file", "evaluate_only"}


def run_record(flags):
    """What a model file records of the run that wrote it: {"id": the run's id (kept in its
    state file, so a resumed run is the same run), "settings": {flag: value} of every flag
    that changes what it trains}. `flags`: the run's flags (a dict)."""
    settings = {name: list(value) if isinstance(value, tuple) else value
                for name, value in flags.items()
                if name not in NOT_SETTINGS and (value is None or isinstance(
                    value, str | int | float | bool | list | tuple))}
    return {"id": flags.get("run_id"), "settings": settings}


class Owner:
    """Which model files a run may replace: those whose record (run_record) is `run`'s id
    or settings; any one when `resumes` (a state of a run from before the records) and the
    model has no record; every one with `overwrite`. `run` None: a run that writes no model
    (--predict, --evaluate-only) replaces none."""

    def __init__(self, run=None, resumes=False, overwrite=False):
        self.run, self.resumes, self.overwrite = run, resumes, overwrite

    @classmethod
    def of(cls, flags, trains=True):
        """The Owner of a run of flags `flags` (a dict; `trains`: it writes models)."""
        return cls(run_record(flags) if trains else None,
                   resumes=flags.get("checkpoint", "None") not in (None, "None"),
                   overwrite=flags.get("overwrite", False))

    def may_replace(self, record):
        if self.overwrite:
            return True
        if self.run is None:
            return False
        if record is None:
            return self.resumes
        return (record.get("id") is not None and record.get("id") == self.run["id"]) or \
            record.get("settings") == self.run["settings"]

    def other_settings(self, record):
        """The settings of `record` that differ from this run's, as flags, for the error."""
        if self.run is None or record is None or not isinstance(record.get("settings"), dict):
            return ""
        theirs, ours = record["settings"], self.run["settings"]
        names = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
        shown = [f"--{n.replace('_', '-')} {_shown(theirs.get(n))} (this run: "
                 f"{_shown(ours.get(n))})" for n in names[:3]]
        return ", ".join(shown) + (", ..." if len(names) > 3 else "")


def _shown(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def model_record(path):
    """(whether `path` is a model file of this project, its run record or None). Only a
    torch.save zip is opened, its tensors mapped, not read."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return False, None
        ckpt = load_torch(path, mmap=True)
    except Exception:  # unreadable, or not a checkpoint: not a model file
        return False, None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in MODEL_KINDS:
        return False, None
    record = ckpt.get("run")
    return True, record if isinstance(record, dict) else None


def check_models_kept(outputs, owner):
    """No output replaces a model file that `owner` may not replace (Owner)."""
    for flag, path in outputs.items():
        if path is None or flag in FOLDER_OUTPUTS or not os.path.isfile(path):
            continue
        is_model, record = model_record(path)
        if not is_model or owner.may_replace(record):
            continue
        if owner.run is None:
            why = "a model, which this run's output would replace"
        elif record is None:
            why = "a model that this run did not write (it records no run)"
        else:
            differ = owner.other_settings(record)
            why = f"the model of another run ({differ or 'another run'})"
        raise UserError(f"{flag} {path} holds {why}: give this run another --output-dir (or "
                        f"{flag.split()[0] if flag.startswith('--') else 'output'} path), or "
                        "--overwrite to replace it")


def _probe_folder(flag, path):
    folder = Path(os.path.abspath(path)).parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:  # the folder may not exist yet: what must be writable is its nearest ancestor
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {existing} "
                        f"({e.strerror or e})") from None


class OutputLock:
    """An exclusive lock beside each output (`.NAME.lock`, holding the owner's PID), kept
    for the whole run: a second run with the same outputs refuses instead of replacing
    them. Leftover temporary files of a killed earlier run are removed once held."""

    def __init__(self, paths):
        self.files, self.made = [], []
        for path in paths:
            if path is not None and fcntl is not None:
                self._lock(Path(os.path.abspath(path)))
        atexit.register(self.release)

    def _lock(self, path):
        lock = path.parent / f".{path.name}.lock"
        # Folders made for the lock (--output-dir) go again at release when the run wrote
        # nothing into them: a refused run leaves no empty folder behind.
        self.made += [p for p in (lock.parent, *lock.parent.parents)
                      if not p.exists() and p not in self.made]
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")  # noqa: SIM115 (held open until release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            self.release()
            raise UserError(f"{path} is an output of a run still going (PID {owner}); wait for "
                            "it, or give this run another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.files.append((lock, handle))
        # files._atomic_write's temporary names: a run killed while writing left them.
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def release(self):
        for lock, handle in self.files:
            with contextlib.suppress(OSError):
                lock.unlink()
            handle.close()
        self.files = []
        for folder in sorted(self.made, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                folder.rmdir()
        self.made = []

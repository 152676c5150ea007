"""Input checks made before any work: flag values, input and output paths, and a lock on
every output, so that bad input costs one line and nothing on disk is lost.

Every problem is a utils.UserError: one line `error: ...`, exit code 2.
"""

import argparse
import atexit
import contextlib
import copy
import errno
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import utils
from utils import UserError

try:
    import fcntl  # POSIX: output locks; elsewhere runs go unlocked
except ImportError:
    fcntl = None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: --flag value: why`, exit 2) and both
    spellings of every flag: the old example's underscores (--batch_size) and dashes
    (--batch-size) name the same flag."""

    def error(self, message):
        # argparse says "argument --lr: invalid float value: 'x'"; keep only the substance.
        message = re.sub(r"^argument (--?[\w-]+)(/--?[\w-]+)*: ", r"\1: ", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    def _add_action(self, action):
        for option in list(action.option_strings):
            if option.startswith("--"):
                other = "--" + option[2:].translate(str.maketrans("_-", "-_"))
                if other != option and other not in self._option_string_actions:
                    action.option_strings.append(other)
        return super()._add_action(action)


def _finite(x):
    return x is not None and math.isfinite(x)


# What each flag must be. A flag a script does not have is skipped; None means "not
# given, take it from elsewhere" (a checkpoint) and is not checked here.
RULES = {
    "optimizer": (lambda x: x in utils.OPTIMIZERS, f"use one of {', '.join(utils.OPTIMIZERS)}"),
    "schedule": (lambda x: x in utils.SCHEDULES, f"use one of {', '.join(utils.SCHEDULES)}"),
    "lr": (lambda x: _finite(x) and x > 0, "must be > 0"),
    "clip": (lambda x: _finite(x) and x > 0, "must be > 0"),
    "epochs": (lambda x: x >= 1, "must be at least 1"),
    "batch_size": (lambda x: x >= 1, "must be at least 1"),
    "bptt": (lambda x: x >= 4, "must be at least 4"),
    "seed": (lambda x: 0 <= x < 2**63 - 2**16, "must be between 0 and 2**63 - 65537"),
    "log_interval": (lambda x: x >= 1, "must be at least 1"),
    "world_size": (lambda x: x >= 1, "must be at least 1"),
    "max_steps": (lambda x: x >= 0, "must be at least 0 (0: no limit)"),
    "num_workers": (lambda x: x >= 0, "must be at least 0"),
    "save_every": (lambda x: x >= 0, "must be at least 0 (0: at epoch ends only)"),
    "emsize": (lambda x: x >= 1, "must be at least 1"),
    "nhid": (lambda x: x >= 1, "must be at least 1"),
    "nlayers": (lambda x: x >= 1, "must be at least 1"),
    "nhead": (lambda x: x >= 1, "must be at least 1"),
    "dropout": (lambda x: _finite(x) and 0 <= x < 1, "must be in [0, 1)"),
    "mask_frac": (lambda x: _finite(x) and 0 < x < 1, "must be in (0, 1)"),
    "min_freq": (lambda x: x >= 1, "must be at least 1"),
    "vocab_size": (lambda x: 6 <= x <= 2**31 - 1, "must be at least 6"),
    "frac_ns": (lambda x: _finite(x) and 0 <= x <= 1, "must be in [0, 1]"),
    "min_sentence_len": (lambda x: x >= 2, "must be at least 2 (a line is cut in two)"),
    "doc_stride": (lambda x: x >= 1, "must be at least 1"),
    "max_query_len": (lambda x: x >= 0, "must be at least 0"),
    "max_answer_len": (lambda x: x >= 1, "must be at least 1"),
    "null_threshold": (_finite, "must be a finite number"),
    "weight_decay": (lambda x: _finite(x) and x >= 0, "must be at least 0"),
    "warmup": (lambda x: _finite(x) and 0 <= x < 1, "must be in [0, 1)"),
    "grad_accum": (lambda x: x >= 1, "must be at least 1"),
    "eps": (lambda x: _finite(x) and x > 0, "must be > 0"),
    "betas": (lambda x: all(_finite(b) and 0 <= b < 1 for b in x), "must each be in [0, 1)"),
}


def parse_args(parser, argv=None):
    """Parse flags and check their values; with --checkpoint, start from the flags saved in
    the state file and apply only those given on this command line."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        if args.checkpoint != "None":
            args = _merge_saved_flags(parser, argv, args)
        args.script = parser.prog
        check_values(args, parser)
        utils.check_training_flags(args)
    except UserError as e:
        parser.error(str(e))
    return args


def _merge_saved_flags(parser, argv, args):
    import torch

    path = args.checkpoint
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file") from None
    except Exception as e:  # torch raises many kinds; its messages advise on unsafe loading
        raise UserError(f"--checkpoint {path}: not a state file of this project "
                        f"({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "state" or "args" not in ckpt:
        raise UserError(f"--checkpoint {path}: not a state file (those are written to "
                        "--state-file)")
    script = ckpt.get("script") or ckpt["args"].get("script")
    foreign = sorted(set(ckpt["args"]) - {a.dest for a in parser._actions} - {"script"})
    if (script and script != parser.prog) or (not script and foreign):
        writer = f"a state file of {script}; resume it with python {script} --checkpoint {path}"
        raise UserError(f"--checkpoint {path}: " + (
            writer if script else f"a state file of another script (with its flags "
                                  f"{', '.join('--' + f for f in foreign[:3])})"))
    merged = dict(ckpt["args"])
    given = explicit_flags(parser, argv)
    merged.update({k: v for k, v in vars(args).items() if k in given or k not in merged})
    return argparse.Namespace(**merged)


def explicit_flags(parser, argv):
    """The flags given on the command line (not defaults): on resume they override the
    saved ones, everything else comes from the state file."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def flag_name(parser, dest):
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def check_values(args, parser):
    """Every flag value against RULES: the first that breaks its rule is the error."""
    for dest, (ok, requirement) in RULES.items():
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
            raise UserError(f"{flag_name(parser, dest)} {shown}: {requirement}")


# The commands that write the scripts' default checkpoints, for "no such file" errors.
MADE_BY = {
    "mlm_bert.pt": "python mlm_task.py", "full_mlm_model.pt": "python mlm_task.py",
    "ns_bert.pt": "python ns_task.py --bert-model mlm_bert.pt",
    "ns_model.pt": "python ns_task.py --bert-model mlm_bert.pt",
    "qa_model.pt": "python qa_task.py --bert-model ns_bert.pt",
}


def check_inputs(inputs):
    """{flag: path} of files a run reads: each must exist (a file, or a folder where the
    flag takes one: a transformers model folder)."""
    for flag, path in inputs.items():
        if path is not None and not os.path.exists(path):
            made_by = MADE_BY.get(os.path.basename(path))
            raise UserError(f"{flag} {path}: no such file"
                            + (f" ({made_by} writes it)" if made_by else ""))


def prepare_run(info, inputs, outputs, data_dir=None, also_read=None):
    """Every path check of a run, before any work; then, on rank 0 (the rank that writes),
    the lock on its outputs, held until the process ends. `also_read`: {flag: path} of
    inputs that may not exist yet (downloads), only kept apart from the outputs."""
    check_inputs(inputs)
    if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir {data_dir}: is a file, not a folder")
    check_outputs(outputs, {**(also_read or {}),
                            **{flag: path for flag, path in inputs.items() if path is not None}})
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


def check_outputs(outputs, inputs):
    """{flag: path} of the files a run writes, against {flag: path} of those it reads:
    no output is a folder, lies under a file, is unwritable, is an input, or is another
    output. Probes each output's folder with a file made and removed."""
    seen = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        for other_flag, other in inputs.items():
            if other is not None and os.path.realpath(other) == real:
                raise UserError(f"{flag} {path} is also {other_flag}: writing it would "
                                "overwrite that input")
        if real in seen:
            raise UserError(f"{flag} {path} is also {seen[real]}: two outputs in one file")
        seen[real] = flag
        if os.path.isdir(path):
            raise UserError(f"{flag} {path}: is a folder; give a file name")
        _probe_folder(flag, path)


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
        self.files = []
        for path in paths:
            if path is not None and fcntl is not None:
                self._lock(Path(os.path.abspath(path)))
        atexit.register(self.release)

    def _lock(self, path):
        lock = path.parent / f".{path.name}.lock"
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
                            "it, or give this run other output names") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.files.append((lock, handle))
        # utils._atomic_write's temporary names: a run killed while writing left them.
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def release(self):
        for lock, handle in self.files:
            with contextlib.suppress(OSError):
                lock.unlink()
            handle.close()
        self.files = []

"""Path checks made before any work: every input exists, every output can be written and
overwrites no input or other output; then a lock on every output for the whole run, so
that bad input costs one line and nothing on disk is lost. (Flag values: bertkit/flags.py.)

Every problem is a files.UserError: one line `error: ...`, exit code 2.
"""

import atexit
import contextlib
import errno
import os
import tempfile
from pathlib import Path

from bertkit.files import UserError

try:
    import fcntl  # POSIX: output locks; elsewhere runs go unlocked
except ImportError:
    fcntl = None


# The commands that write the scripts' default checkpoints, for "no such file" errors.
MADE_BY = {
    "mlm_bert.pt": "python mlm_task.py", "full_mlm_model.pt": "python mlm_task.py",
    "ns_bert.pt": "python ns_task.py --bert-model mlm_bert.pt",
    "ns_model.pt": "python ns_task.py --bert-model mlm_bert.pt",
    "qa_model.pt": "python qa_task.py --bert-model ns_bert.pt",
    "glue_model.pt": "python glue_task.py --bert-model ns_bert.pt --task RTE",
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
    the lock on its outputs, held until the process ends. `also_read`: {what: path} of
    inputs that may not exist yet (downloads) or that no flag names alone (a dataset's
    files, its token cache: corpus.dataset_inputs), only kept apart from the outputs. An
    input that is a folder keeps every output out of it."""
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

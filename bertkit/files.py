"""Files: the bottom layer. Bad input as one line (UserError), and writes that leave either
the old file or the new one, never half of one."""

import os
import tempfile
import warnings

import torch

from utils import DataError, UserError  # noqa: F401  (defined in the core; raised everywhere)

UMASK = os.umask(0)  # the process's, read once (os.umask can only be read by setting it)
os.umask(UMASK)


class WriteError(UserError, OSError):
    """A file could not be written (full disk, permissions): one line naming it. Still an
    OSError, for callers that carry on without the file (the token cache)."""


def _atomic_write(path, write, before_replace=None):
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any point leaves either the old file or the new one, never half of one,
    and a failure leaves no temporary file. `before_replace()` runs once the new file is
    complete, just before it takes the name (bertkit/training/states.py moves the older states then)."""
    path = os.fspath(path)
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a full disk as a RuntimeError of its zip writer.
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, WriteError):
            detail = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
            raise WriteError(f"cannot write {path}: {detail}; the previous file, if any, "
                             "is unchanged") from None
        raise


def in_folder(folder, name):
    """The path of a file `name` a run writes into `folder` (--output-dir): just `name`
    when that is the current folder, as the old example wrote it."""
    return name if os.path.normpath(folder) == "." else os.path.join(folder, name)


def atomic_save(obj, path, before_replace=None):
    _atomic_write(path, lambda f: torch.save(obj, f), before_replace)


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_torch(path, **kwargs):
    """torch.load(path, weights_only=True, map_location="cpu") without torch's warnings: on a
    file that is not a checkpoint (random bytes that start like a pickle) torch prints a
    UserWarning before failing, and the caller's one-line error should be all a user sees."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)

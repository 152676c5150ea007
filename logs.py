"""What a run shows and records: log lines (rank 0), progress bars, the metrics log
(JSON lines, and TensorBoard), and the old example's loss log.

Metrics travel as dicts of numbers ({"loss": 6.5, "ppl": 665.1}); the log line is
formatted from them (format_metrics) and the metrics log records them unrounded.
"""

import json
import math
import shlex
import sys

from files import UserError, atomic_write_text


def make_logger(info):
    def log(*parts):
        if info.is_main:
            print_line(" ".join(map(str, parts)))

    return log


def print_line(text):
    """print(), but above the progress bars when they are shown (a plain print would cut
    a bar's line in two)."""
    if _progress["enabled"] and "tqdm" in sys.modules:
        sys.modules["tqdm"].tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(text, flush=True)


# Progress bars are a display setting of the process, like a logging level: set once per
# rank (set_progress: --no-progress, rank 0 only) and read by every long loop, rather than
# passed through every loader's signature. None: shown when stderr is a terminal.
_progress = {"enabled": None, "hinted": False}


def set_progress(enabled):
    """False: no bars; None: bars when stderr is a terminal (the default)."""
    _progress["enabled"] = None if enabled is None else bool(enabled)


def bars_shown():
    """Whether progress bars are on: set_progress's choice, else whether stderr is a terminal
    (without one, a batch job, the trainer prints a log line at least every 30 s instead)."""
    if _progress["enabled"] is None:
        _progress["enabled"] = sys.stderr.isatty()
    return _progress["enabled"]


def progress(iterable=None, total=None, desc=None, unit="it", **kwargs):
    """tqdm(iterable, ...) with its rate and ETA on stderr, or the iterable itself (with
    tqdm's update/close doing nothing) when bars are off or tqdm is not installed."""
    if not bars_shown():
        return NoProgress(iterable)
    try:
        from tqdm import tqdm
    except ImportError:
        if not _progress["hinted"]:
            _progress["hinted"] = True
            print("no progress bars: pip install tqdm (or pass --no-progress)", file=sys.stderr)
        return NoProgress(iterable)
    # leave=False: a finished bar disappears, so the log reads as it always did.
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                **kwargs)


class NoProgress:
    """What progress() returns when bars are off: the iterable, and tqdm's methods as no-ops."""

    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        pass

    def close(self):
        pass


class MetricsLog:
    """The machine-readable log of a run: one JSON object per line in `path` (opened on
    the first row; appended to when resuming), and the same numbers as TensorBoard
    scalars in `tensorboard_dir` when given. Rank 0 only."""

    def __init__(self, path, tensorboard_dir=None, append=False):
        self.path, self.tensorboard_dir, self.append = path, tensorboard_dir, append
        self.file = self.writer = None

    def write(self, row):
        if self.file is None:
            self.file = open(self.path, "a" if self.append else "w", encoding="utf-8")
            if self.tensorboard_dir:
                self.writer = tensorboard_writer(self.tensorboard_dir)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()  # a run can be watched (and plotted) while it trains
        if self.writer is not None:
            for name, value in row.items():
                if name not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, row["step"])
            self.writer.flush()

    def files(self):
        """The files written so far, as 'path (what)'."""
        written = [f"{self.path} (metrics)"] if self.file else []
        if self.writer is not None:
            written.append(f"{self.tensorboard_dir}/ (TensorBoard)")
        return written

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def tensorboard_writer(folder):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(folder)


# How each metric is shown in a log line; "%" marks a percentage. Unknown names: general.
DISPLAY = {"loss": "8.5f", "ppl": "8.2f", "accuracy": "5.2f%", "exact": ".2f%", "f1": ".2f%",
           "tokens": "d", "pairs": "d", "questions": "d", "examples": "d",
           "matthews_correlation": ".2f", "pearson": ".2f", "spearmanr": ".2f"}


def format_metrics(split, metrics):
    """'valid loss  6.50000 | valid ppl   665.14 | valid tokens 1234' of {"loss": 6.5,
    "ppl": 665.14, "tokens": 1234}: the counts ("tokens", "pairs", "questions") say how
    much was scored."""
    parts = []
    for name, value in metrics.items():
        spec = DISPLAY.get(name.removesuffix("_mm"), "g")  # MNLI's mismatched set: as matched
        shown = f"{value:{spec.rstrip('%')}}" + ("%" if spec.endswith("%") else "")
        parts.append(f"{split} {name} {shown}")
    return " | ".join(parts)


def perplexity(loss):
    return math.exp(min(loss, 700))


def write_loss_log(path, train_loss, val_loss, test_loss, settings):
    """The old example's <task>_loss.txt: the settings, then losses per epoch."""
    lines = [f"{k}:    {v}" for k, v in settings.items()]
    lines += [f"epoch {i:3d} | train loss {v:8.5f}" for i, v in enumerate(train_loss, 1)]
    lines += [f"epoch {i:3d} | val loss {v:8.5f}" for i, v in enumerate(val_loss, 1)]
    lines.append(f"test loss {test_loss:8.5f}")
    atomic_write_text(path, "\n".join(lines) + "\n")


def resume_command(state_file):
    """The command that resumes a run, from the folder it was started in: the script's path
    as it was given (python ../bert/mlm_task.py), not only its name."""
    return shlex.join(["python", sys.argv[0], "--checkpoint", str(state_file)])

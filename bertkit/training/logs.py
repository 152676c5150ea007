"""What a run shows and records: log lines (rank 0), the training loss between them
(LogWindow), progress bars, the metrics log (JSON lines, and TensorBoard), and the old
example's loss log.

Metrics travel as dicts of numbers ({"loss": 6.5, "ppl": 665.1}); the log line is
formatted from them (format_metrics) and the metrics log records them unrounded.
"""

import json
import math
import os
import shlex
import sys
import time

import torch

from bertkit.files import UserError, atomic_write_text


def make_logger(info):
    def log(*parts):
        if info.is_main:
            print_line(" ".join(map(str, parts)))

    return log


def to_stderr(text):
    """A line beside a command's output (--predict's JSON lines on stdout): on stderr."""
    print(text, file=sys.stderr, flush=True)


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
    the first row), and the same numbers as TensorBoard scalars in `tensorboard_dir` when
    given. Rank 0 only. A resumed run continues the log (resume): each step's rows appear
    once, in order, however often the run was stopped and resumed."""

    def __init__(self, path, tensorboard_dir=None):
        self.path, self.tensorboard_dir = path, tensorboard_dir
        self.file = self.writer = None
        self.rows = 0  # in the file: saved with each state file, for resume
        self.mode, self.purge_step = "w", None

    def resume(self, step, rows=None):
        """Continue the log of a run resumed at optimizer step `step`: the rows the stopped
        run wrote after its state are removed (the file rewritten atomically): all but the
        first `rows`, the log's length when the state was written, or (`rows` None: a
        state file without it, or another log) the rows of steps after `step`. TensorBoard
        drops its events of those steps (purge_step)."""
        self.mode, self.purge_step = "a", step + 1
        self.rows = keep_rows(self.path, rows, step)

    def write(self, row):
        if self.file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self.file = open(self.path, self.mode, encoding="utf-8")
            if self.tensorboard_dir:
                self.writer = tensorboard_writer(self.tensorboard_dir, self.purge_step)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()  # a run can be watched (and plotted) while it trains
        self.rows += 1
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


def keep_rows(path, rows, step):
    """Cut the JSON-lines log at `path` to its first `rows` lines, or (None) to its rows of
    steps up to `step`; an unfinished last line goes too. Returns the rows kept."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return 0
    complete = [line for line in lines if line.endswith("\n")]
    if rows is None:
        kept = []
        for line in complete:
            try:
                if json.loads(line).get("step", 0) > step:
                    break
            except (ValueError, AttributeError):  # not a row of this project's log
                break
            kept.append(line)
    else:
        kept = complete[:rows]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(kept)


def tensorboard_writer(folder, purge_step=None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    # purge_step: a resumed run's first step; TensorBoard hides the events of the stopped
    # run from there on.
    return SummaryWriter(folder, purge_step=purge_step)


class LogWindow:
    """The training loss, steps and tokens since the last log line (the loss stays on the
    device until read)."""

    def __init__(self, device, n_batches, n_steps):
        self.n_batches, self.n_steps = n_batches, n_steps  # of the epoch
        self.loss_sum = torch.zeros((), device=device)
        self.batches = self.steps = self.tokens = 0
        self.start = time.time()

    def add(self, loss_sum, batches):
        self.loss_sum += loss_sum
        self.batches += len(batches)
        self.steps += 1
        self.tokens += sum(batch["inputs"].numel() for batch in batches)

    def read_and_reset(self):
        """(mean loss per batch, seconds) since the last call; last_steps and last_tokens
        keep the counts of that window."""
        loss, seconds = self.loss_sum.item() / self.batches, time.time() - self.start
        self.last_steps, self.last_tokens = self.steps, self.tokens
        self.loss_sum.zero_()
        self.batches = self.steps = self.tokens = 0
        self.start = time.time()
        return loss, seconds


# Without progress bars (no terminal: a batch job), a log line at least this often as well
# as every --log-interval steps, so that a slow or short run is never silent for minutes.
LOG_EVERY_SECONDS = 30


class RunLog:
    """What a training run shows and records (trainer.Trainer): the old example's line of
    the training loss and each evaluation's, with their rows in the metrics log (a
    MetricsLog). `log` prints rank 0's lines; `peak_lr`: --lr. `state`, below: the
    Trainer's TrainState (epoch, step_in_epoch, global_step). `training_metrics(loss)`:
    the task's own measure a training line shows beside its loss ({"ppl": ...} of MLM,
    {"accuracy": ...} of a classifier: TrainingAccuracy), None for none."""

    def __init__(self, log, metrics, info, peak_lr, training_metrics=None):
        self.log, self.metrics, self.info, self.peak_lr = log, metrics, info, peak_lr
        self.training_metrics = training_metrics or (lambda loss: {})

    def resume(self, ckpt, step, metrics_file):
        """A run resumed from state file `ckpt` at optimizer step `step` (rank 0): the rows
        the stopped run wrote after its state go (MetricsLog.resume), counted by the state
        when it was written to this same log."""
        same_log = ckpt.get("args", {}).get("metrics_file") == metrics_file
        self.metrics.resume(step, ckpt.get("metrics_rows") if same_log else None)

    def due(self, window):
        """Rank 0 without bars, LOG_EVERY_SECONDS after its last line. Only the clock is read
        (no host sync), and the line is rank 0's own loss: no collective the others miss."""
        return (self.info.is_main and not bars_shown()
                and time.time() - window.start >= LOG_EVERY_SECONDS)

    def training(self, window, state, step_in_epoch, lr):
        """The old example's log line (a "batch" is an optimizer step) of the loss since the
        last (`window`), and its metrics row; `lr`: the last step's."""
        loss, seconds = window.read_and_reset()
        ms_per_step = seconds * 1000 / window.last_steps
        # The task's own measure beside the loss: MLM's perplexity, a classifier's accuracy.
        shown = self.training_metrics(loss)
        self.log(f"| epoch {state.epoch:3d} | {step_in_epoch:5d}/{window.n_steps:5d} batches | "
                 f"lr {lr_text(lr, self.peak_lr)} | ms/batch {ms_per_step:5.2f} | "
                 f"loss {loss:5.2f}{beside_loss(shown)}")
        if self.info.is_main:
            self.metrics.write({
                "step": state.global_step, "epoch": state.epoch, "loss": loss, "lr": lr,
                "tokens_per_s": window.last_tokens * self.info.world_size / seconds,
                "ms_per_step": ms_per_step, **{k: v for k, v in shown.items() if k != "ppl"}})

    def evaluation(self, split, metrics, state, where, rule="-"):
        """An evaluation's row of the metrics log (rank 0): its numbers as they are, at the
        step and epoch of the last optimizer step (fit moves to the next epoch after its
        validation, before any step of it); then its log line between two rules, `where`
        its first part."""
        epoch = state.epoch - 1 if state.step_in_epoch == 0 and state.epoch > 1 else state.epoch
        if self.info.is_main:
            self.metrics.write(evaluation_row(split, metrics, state.global_step, epoch))
        self.log(rule * 89)
        self.log(f"| {where} | {format_metrics(split, metrics)}")
        self.log(rule * 89)


class TrainingAccuracy:
    """A classifier's accuracy on its training batches since the last log line (the
    next-sentence head's, a GLUE classifier's), counted on the device until read. A
    regression's one output has none: read_and_reset gives {}."""

    def __init__(self, device):
        self.right = torch.zeros((), device=device)
        self.seen = torch.zeros((), device=device)

    def add(self, logits, labels):
        if logits.size(-1) > 1:
            self.right += (logits.detach().argmax(-1) == labels).sum()
            self.seen += len(labels)

    def read_and_reset(self):
        right, seen = self.right.item(), self.seen.item()
        self.right.zero_()
        self.seen.zero_()
        return {"accuracy": 100 * right / seen} if seen else {}


class PretrainingSums:
    """mlm_task.py's training measures since the last log line: the perplexity of the
    loss, and with --next-sentence that of its MLM part and the next-sentence accuracy
    (summed on the device until read)."""

    def __init__(self, device, next_sentence):
        self.next_sentence = next_sentence
        self.mlm = torch.zeros((), device=device)
        self.steps = 0
        self.accuracy = TrainingAccuracy(device)

    def add_mlm(self, loss):
        self.mlm += loss.detach()
        self.steps += 1

    def add_ns(self, logits, labels):
        self.accuracy.add(logits, labels)

    def read_and_reset(self, loss):
        if not self.next_sentence:
            return {"ppl": perplexity(loss)}
        mlm_loss = self.mlm.item() / max(self.steps, 1)
        self.mlm.zero_()
        self.steps = 0
        accuracy = self.accuracy.read_and_reset().get("accuracy", float("nan"))
        return {"mlm_loss": mlm_loss, "ppl": perplexity(mlm_loss), "ns_accuracy": accuracy}


def epoch_end(epoch, step, complete, seconds):
    """The validation line's start after an epoch's training: the old example's "end of
    epoch", or where --max-steps stopped it within the epoch."""
    where = f"end of epoch {epoch:3d}" if complete else (
        f"step {step:6d} | epoch {epoch:3d} (--max-steps)")
    return f"{where} | time: {seconds:5.2f}s"


def lr_text(lr, peak):
    """The old example's 'lr 5.00000', or '2.00e-05' in a run whose --lr is below 1e-3
    (fine-tuning's), where five decimals would print its warmup and decay as 0.00000."""
    return f"{lr:05.5f}" if peak >= 1e-3 else f"{lr:.2e}"


# How each metric is shown in a log line; "%" marks a percentage. Unknown names: general.
DISPLAY = {"loss": "8.5f", "ppl": "8.2f", "accuracy": "5.2f%", "mlm_loss": "5.2f",
           "ns_accuracy": "5.2f%", "exact": ".2f%", "f1": ".2f%",
           "matthews_correlation": ".2f", "pearson": ".2f", "spearmanr": ".2f"}
# The counts of what an evaluation scored, and what each counts: shown as "scored N ...".
COUNTS = {"tokens": "masked tokens", "pairs": "pairs", "questions": "questions",
          "examples": "examples"}


def format_metrics(split, metrics):
    """'valid loss  6.50000 | valid ppl   665.14 | scored 1234 masked tokens' of
    {"loss": 6.5, "ppl": 665.14, "tokens": 1234}: the counts (COUNTS) say how much was
    scored (MLM: the masked tokens, where the loss is measured)."""
    parts = []
    for name, value in metrics.items():
        base = name.removesuffix("_mm")  # MNLI's mismatched set: shown as the matched
        if base in COUNTS:
            mismatched = "mismatched " if base != name else ""
            parts.append(f"scored {value} {mismatched}{COUNTS[base]}")
            continue
        parts.append(f"{split} {name} {shown_value(base, value)}")
    return " | ".join(parts)


def beside_loss(metrics):
    """' | ppl   665.14', ' | accuracy 71.25%': a training log line's metrics after its
    loss."""
    return "".join(f" | {name} {shown_value(name, value)}" for name, value in metrics.items())


def shown_value(name, value):
    """A metric's value as log lines show it (DISPLAY): '665.14', '75.00%'."""
    spec = DISPLAY.get(name, "g")
    return f"{value:{spec.rstrip('%')}}" + ("%" if spec.endswith("%") else "")


def evaluation_row(split, metrics, step, epoch):
    """An evaluation's row of the metrics log: {"step", "epoch", "<split>_<name>": ...}."""
    return {"step": step, "epoch": epoch,
            **{f"{split}_{name}": value for name, value in metrics.items()}}


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

"""The training loop of the three tasks: optimizer steps with gradient accumulation,
validation and the best model, the state file every --save-every steps and epoch, the stop
on a signal or a NaN. Around it, a module each: the state files and a resume's restore
(states.py), what the run shows and records (logs.py), the end of a run (ending.py: test the
best model, write and list every output).

A task tells the Trainer what it needs and nothing more:

    task.config, task.vocab           # saved with every state file
    task.train_batches(epoch)         # a data.Batches of the rank's batches of an epoch
    task.loss(model, batch)           # a scalar
    task.evaluate(model, split)       # {"loss": ..., other metrics}: numbers, every rank
    task.best_metric                  # (name, "min" or "max"): the metric that picks the
                                      # best model of the run
    task.save_best(model)             # rank 0: write the best model so far ...
    task.best_model_path              # ... there, where every rank reads it after fit
    task.new_best()                   # optional, every rank: that validation was the best
    task.outputs                      # {flag or description: (path, what)}: every file the
                                      # run writes besides the Trainer's own; among them
                                      # "--save-vocab" and "the loss log"
    task.write_outputs(model)         # rank 0, after the test: the task's own files
                                      # (the encoder; the predictions)
    task.training_metrics(loss)       # optional: what a training log line shows besides
                                      # the loss ({"ppl": ...}, {"accuracy": ...})
    task.name                         # optional: the task its state file records (the
                                      # GLUE task, the SQuAD version)

The Trainer reads its settings from a TrainConfig, checked once when it is made
(bertkit/flags.py makes it of the flags: flags.train_config).
"""

import contextlib
import functools
import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

import data
import utils
from bertkit import checkpoint
from bertkit.files import UserError
from bertkit.training import budget, distributed, ending, logs, states
from bertkit.training.optimizer import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler
from model import count_parameters

###############################################################################
# Settings
###############################################################################

@dataclass
class TrainConfig:
    """What the Trainer reads: the training flags (bertkit/flags.py maps them), checked once here.
    The defaults are the old example's: plain SGD, lr x0.1 when validation does not improve."""

    lr: float
    clip: float
    epochs: int
    batch_size: int  # sequences per batch and per process
    seed: int
    log_interval: int | None  # None: default_log_interval, less on a short run (LOG_POINTS)
    state_file: str
    metrics_file: str
    max_steps: int = 0  # 0: no limit
    num_workers: int = 0
    save_every: int = 0  # 0: at epoch ends only
    eval_every: int = 0  # validate every N optimizer steps too; 0: at epoch ends only
    eval_batches: int = 0  # at most N batches per evaluation (read by the tasks); 0: all
    optimizer: str = "sgd"
    schedule: str = "plateau"
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup: float = 0.0  # fraction of all optimizer steps
    grad_accum: int = 1
    dtype: str = "fp32"
    compile: bool = False
    checkpoint: str = None  # a state file to resume from (flags.parse_args resolves auto)
    keep_states: int = 2  # state files kept: the newest at state_file, the others beside it
    slurm_requeue: bool = False  # requeue the SLURM job when stopped by SIGTERM or SIGUSR1
    tensorboard: str = None
    evaluate_only: bool = False  # evaluate the starting model, write only the metrics log
    default_log_interval: int = 10  # the script's --log-interval when it is not given

    RULES: ClassVar = {
        "optimizer": (utils.one_of(*OPTIMIZERS), f"use one of {', '.join(OPTIMIZERS)}"),
        "schedule": (utils.one_of(*SCHEDULES), f"use one of {', '.join(SCHEDULES)}"),
        "lr": (utils.positive, "must be > 0"),
        "clip": (utils.positive, "must be > 0"),
        "epochs": (utils.at_least(1), "must be at least 1"),
        "batch_size": (utils.at_least(1), "must be at least 1"),
        "seed": (lambda x: 0 <= x < 2**63 - 2**16, "must be between 0 and 2**63 - 65537"),
        "log_interval": (utils.at_least(1), "must be at least 1"),
        "max_steps": (utils.at_least(0), "must be at least 0 (0: no limit)"),
        "num_workers": (utils.at_least(0), "must be at least 0"),
        "save_every": (utils.at_least(0), "must be at least 0 (0: at epoch ends only)"),
        "keep_states": (utils.at_least(1), "must be at least 1 (1: the newest state only)"),
        "eval_every": (utils.at_least(0), "must be at least 0 (0: at epoch ends only)"),
        "eval_batches": (utils.at_least(0), "must be at least 0 (0: every batch)"),
        "weight_decay": (lambda x: utils.finite(x) and x >= 0, "must be at least 0"),
        "warmup": (utils.fraction, "must be in [0, 1)"),
        "grad_accum": (utils.at_least(1), "must be at least 1"),
        "eps": (utils.positive, "must be > 0"),
        "betas": (lambda x: all(utils.fraction(b) for b in x), "must each be in [0, 1)"),
    }

    def __post_init__(self):
        utils.check_rules(self, self.RULES)
        self.betas = tuple(self.betas)
        if self.warmup and self.schedule == "plateau":
            raise utils.SettingError("warmup", self.warmup, "needs --schedule linear or cosine "
                                     "(plateau's lr changes only at epoch ends)")
        if self.evaluate_only and self.checkpoint not in (None, "None"):
            raise UserError(f"--evaluate-only evaluates --bert-model; --checkpoint "
                            f"{self.checkpoint} would resume a training: give one of them")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")

    def log_every(self, total_steps):
        """Optimizer steps between log lines: --log-interval, or when it is not given the
        script's, less on a run too short for LOG_POINTS lines of it (a plot needs points)."""
        return self.log_interval or max(1, min(self.default_log_interval,
                                               total_steps // LOG_POINTS))


# --log-interval left out: the script's default, but at least this many log lines (and
# metrics rows, the points of plot.py's curves) over a run shorter than that gives.
LOG_POINTS = 50


###############################################################################
# The loop
###############################################################################


@dataclass
class TrainState:
    """Where training is; saved in the state file, together with model and optimizer."""

    epoch: int = 1
    step_in_epoch: int = 0  # batches of the epoch done (--grad-accum of them per step)
    global_step: int = 0  # optimizer steps done
    best_score: float = None  # lower is better; QA stores -F1
    train_loss_log: list = field(default_factory=list)
    val_loss_log: list = field(default_factory=list)
    epoch_loss_sum: float = 0.0  # of the current epoch so far, for its train_loss_log entry
    evaluated_step: int = -1  # global_step of the last validation
    budget: dict = None  # --time-budget's steps and time spent (budget.TimeBudget.state)


class NonFiniteLoss(UserError):
    pass


class Trainer:
    """The epoch loop of all three tasks (see the module docstring for the task's part)."""

    def __init__(self, task, model, config, info, device, log, flags=None):
        """`config`: a TrainConfig; `flags`: every flag of the run, saved in the state file
        so that a resume needs none repeated (flags.parse_args merges them)."""
        self.task, self.config, self.info, self.device, self.log = task, config, info, device, log
        self.flags = dict(flags or {})
        self.started = time.time() - 1  # files older than this were not written by this run
        self.state = TrainState()
        self.preemption = distributed.Preemption()
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")
        self.epoch_loss = torch.zeros((), device=device)
        self.trained_len = TrainedLength(task.config, device, info)
        # The defaults are the old example's: plain SGD, lr x0.1 when validation does not improve.
        self.optimizer = make_optimizer(model, config, device)
        self.per_step_schedule = config.schedule != "plateau"
        ckpt = config.checkpoint and checkpoint.load_checkpoint(config.checkpoint, "--checkpoint")
        self.budget = budget.TimeBudget(config, self.flags, info, device, log, ckpt)  # before the lr
        self.scheduler = make_scheduler(self.optimizer, config, self.total_steps() if
                                        self.per_step_schedule else None)
        self.step_lr = config.lr  # the lr of the last optimizer step, for the logs
        self.run_log = logs.RunLog(log, logs.MetricsLog(config.metrics_file, config.tensorboard),
                                   info, config.lr, getattr(task, "training_metrics", None))
        self.state_files = states.StateFiles(config, info, device, self.flags, task.vocab,
                                             getattr(task, "name", None))
        self.exit_code = 0
        if config.checkpoint is not None:
            self.resume(ckpt, model)
        elif info.rank > 0:
            # Every rank built the same initial weights from --seed (DDP checks they agree);
            # from here on each draws its own dropout masks. Rank 0 keeps --seed's stream,
            # so a single-process run is what it always was.
            torch.manual_seed(config.seed + info.rank)
        # Compile the module, then wrap it in DDP (PyTorch's current advice for the pair).
        self.model = torch.compile(model) if config.compile else model
        self.model = distributed.wrap_ddp(self.model, device, info)
        self.budget.start(self)  # --time-budget: the steps that fit, measured

    @functools.cached_property
    def log_interval(self):  # the run's steps are counted only when --log-interval is not given
        return self.config.log_interval or self.config.log_every(self.total_steps())

    def steps_per_epoch(self, n_batches):
        return -(-n_batches // self.config.grad_accum)

    @contextlib.contextmanager
    def step_groups(self, batches, start):
        """The optimizer steps' groups of `batches` from batch `start`, built ahead by a
        prefetch thread, which stops on leaving (train_epoch; budget.py times these)."""
        loader = data.batch_loader(batches, start, self.config.num_workers,
                                   self.device.type == "cuda")
        with data.Prefetch(loader) as ready:
            yield data.micro_batch_groups(ready, self.config.grad_accum)

    def total_steps(self):
        """Optimizer steps of the whole run: --epochs of them, or --max-steps if fewer."""
        total = self.config.epochs * self.steps_per_epoch(len(self.task.train_batches(1)))
        return min(total, self.config.max_steps) if self.config.max_steps else total

    # -- state file ---------------------------------------------------------
    def save_state(self):
        """The state file of this step (states.StateFiles); every rank calls this."""
        self.state.epoch_loss_sum = float(self.epoch_loss)
        self.state.budget = self.budget.state()
        self.trained_len.record()
        parts = {"model": distributed.unwrap(self.model).state_dict(),
                 "config": self.task.config.to_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "train_state": vars(self.state).copy()}
        self.state_files.save(parts, getattr(self.task, "best_model_path", None),
                              self.run_log.metrics.rows)

    def resume(self, ckpt, model):
        """The run of the state file --checkpoint, continued: the model, optimizer, schedule,
        scaler, training state and this rank's random streams (states.restore checks it);
        the metrics log cut back to it."""
        path = self.config.checkpoint
        self.state = st = TrainState(**states.restore(
            ckpt, path, model, self.optimizer, self.scheduler, self.scaler, self.config,
            self.info.rank, self.device))
        self.trained_len.resume(ckpt)
        if self.info.is_main:
            self.run_log.resume(ckpt, st.global_step, self.config.metrics_file)
        self.log(f"resumed from {path} at epoch {st.epoch}, step {st.step_in_epoch} of the "
                 f"epoch ({st.global_step} in all)")

    # -- loop ---------------------------------------------------------------
    def fit(self):
        """Train until --epochs or --max-steps; returns True when stopped by a signal."""
        st = self.state
        while not self.training_done():
            epoch_start = time.time()
            stopped = self.train_epoch()
            if stopped == "signal":
                return True
            if st.evaluated_step != st.global_step:  # not validated at this step already
                self.validate(logs.epoch_end(st.epoch, st.global_step, self.epoch_complete,
                                             time.time() - epoch_start))
            st.epoch += 1
            st.step_in_epoch = 0
            self.epoch_loss.zero_()
            self.save_state()
            if stopped == "max_steps":
                break
        return False

    def training_done(self):
        """--epochs done, or --max-steps and the validation after it (a resume of the
        state written at the end of fit trains no more)."""
        st, max_steps = self.state, self.config.max_steps
        return st.epoch > self.config.epochs or bool(
            max_steps and st.global_step >= max_steps and st.step_in_epoch == 0)

    def max_steps_done(self):
        return bool(self.config.max_steps and self.state.global_step >= self.config.max_steps)

    def validate(self, where):
        """Evaluate the valid split; keep the model if it is the best so far; the old
        schedule's lr x0.1 if it is not. `where`: the log line's first part."""
        st = self.state
        self.trained_len.record()  # before save_best writes the model
        metrics = self.task.evaluate(distributed.unwrap(self.model), "valid")
        st.val_loss_log.append(metrics["loss"])
        st.evaluated_step = st.global_step
        self.run_log.evaluation("valid", metrics, st, where)
        score = best_score(metrics, self.task.best_metric)
        if st.best_score is None or score < st.best_score:
            st.best_score = score
            if self.info.is_main:
                self.task.save_best(distributed.unwrap(self.model))
            if hasattr(self.task, "new_best"):
                self.task.new_best()
        elif not self.per_step_schedule:
            self.scheduler.step()  # the old schedule: lr x0.1 when validation does not improve

    def step(self, batches):
        """One optimizer step over `batches` (--grad-accum of them, already on the device);
        returns the sum of their losses as a tensor (no host sync).

        Each loss is divided by the number of batches, so that the summed gradients are
        those of one batch of all their sequences."""
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            with distributed.no_sync(self.model, last=i == len(batches) - 1):
                with utils.autocast(self.device, self.config.dtype):
                    loss = self.task.loss(self.model, batch)
                self.scaler.scale(loss / len(batches) if len(batches) > 1 else loss).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_schedule:
            self.scheduler.step()
        return loss_sum

    def train_epoch(self):
        config, st = self.config, self.state
        if (config.eval_every and st.step_in_epoch and st.evaluated_step != st.global_step
                and st.global_step % config.eval_every == 0):
            # Stopped by a signal at a validation step, before validating: do it now.
            self.validate(f"step {st.global_step:6d} | epoch {st.epoch:3d}")
        self.model.train()
        batches = self.task.train_batches(st.epoch)
        window = logs.LogWindow(self.device, len(batches), self.steps_per_epoch(len(batches)))
        self.epoch_loss.fill_(st.epoch_loss_sum)
        first_bad_step = torch.full((), -1, device=self.device)
        self.bar = logs.progress(total=len(batches), initial=st.step_in_epoch, unit="batch",
                                  desc=f"epoch {st.epoch}")
        stopped = None
        with self.step_groups(batches, st.step_in_epoch) as groups:
            # Resumed from a state written at --max-steps (stopped there): no more steps.
            for group in () if self.max_steps_done() else groups:
                stopped = self.train_step(group, window, first_bad_step)
                if stopped:
                    break
        self.bar.close()
        self.epoch_complete = st.step_in_epoch == len(batches)
        if stopped == "signal":
            return stopped
        if st.step_in_epoch:
            st.train_loss_log.append(self.epoch_loss.item() / st.step_in_epoch)
        self.epoch_loss.zero_()
        return "max_steps" if self.max_steps_done() else None

    def train_step(self, group, window, first_bad_step):
        """One optimizer step of the epoch over `group` (its batches), then after_step."""
        st = self.state
        # No .item() here: a host sync every step stalls the GPU. Losses and the first
        # non-finite step are accumulated on the device and read at log time.
        batches = [utils.to_device(batch, self.device) for batch in group]
        self.trained_len.note(batches)
        loss_sum = self.step(batches)
        bad = ~torch.isfinite(loss_sum)
        first_bad_step.copy_(torch.where(bad & (first_bad_step < 0), st.global_step + 1,
                                         first_bad_step))
        window.add(loss_sum, group)
        self.epoch_loss += loss_sum
        st.step_in_epoch += len(group)
        st.global_step += 1
        self.bar.update(len(group))
        return self.after_step(window, first_bad_step)

    def after_step(self, window, first_bad_step):
        """Log, save, and stop checks after an optimizer step; returns "signal" or
        "max_steps" to end the epoch, else None."""
        config, st = self.config, self.state
        step_in_epoch = self.steps_per_epoch(st.step_in_epoch)  # optimizer steps
        at_log = step_in_epoch % self.log_interval == 0
        at_save = config.save_every and st.global_step % config.save_every == 0
        at_max = self.max_steps_done() or self.budget.out_of_time(st.global_step)
        at_end = st.step_in_epoch == window.n_batches
        # Under DDP every rank must reach the same checks (a collective); alone, a
        # signal is acted on at the next step.
        at_check = at_log or at_save or at_max or at_end or (
            st.global_step % distributed.SIGNAL_CHECK_EVERY == 0 if self.info.enabled
            else self.preemption.requested)
        stop_signal = 0
        if at_check:
            bad_step, stop_signal = distributed.sync_stop_flags(
                first_bad_step, self.preemption.signal, self.info)
            check_finite(bad_step, config.state_file)
        if at_log or self.run_log.due(window):
            self.run_log.training(window, st, step_in_epoch, self.step_lr)
        if stop_signal:
            self.save_state()
            self.exit_code = ending.stopped(stop_signal, st.global_step, config, self.info,
                                            self.device, self.log)
            return "signal"
        if config.eval_every and st.global_step % config.eval_every == 0:
            started = time.time()
            self.validate(f"step {st.global_step:6d} | epoch {st.epoch:3d}")
            window.start += time.time() - started  # the next ms/batch: training steps only
        if at_save:
            self.save_state()
        return "max_steps" if at_max else None


class TrainedLength:
    """The longest sequence trained on (BertConfig.trained_len) of the task's `config`: the
    starting weights', then the longest of every batch, kept on the device until a
    checkpoint is written."""

    def __init__(self, config, device, info):
        self.config, self.info = config, info
        self.longest = torch.full((), config.trained_len or 0, device=device)

    def note(self, batches):
        """Training batches' longest sequence of real tokens (the padding mask's, else the
        batch's width), without a host sync."""
        for batch in batches:
            mask = batch.get("padding_mask")
            if mask is None:
                self.longest.clamp_(min=batch["inputs"].size(1))
            else:
                torch.maximum(self.longest, mask.sum(1).max(), out=self.longest)

    def resume(self, ckpt):
        """At least the trained_len of the state file a run resumes."""
        self.longest.clamp_(min=ckpt["config"].get("trained_len") or 0)

    def record(self):
        """The longest sequence trained on so far, over all ranks, into the task's config:
        every checkpoint written from here on records it (every rank calls this)."""
        longest = int(distributed.all_reduce_max(self.longest.clone(), self.info))
        if longest:
            self.config.trained_len = longest


def best_score(metrics, best_metric):
    """The task's best_metric (name, "min" or "max") as a score where lower is better
    (QA's: -F1); NaN (a diverged model's correlation, say) is worse than any number."""
    name, direction = best_metric
    score = -metrics[name] if direction == "max" else metrics[name]
    return math.inf if math.isnan(score) else score


def check_finite(step, state_file):
    """The NaN stop: `step`, the first optimizer step whose loss was not finite (-1: none)."""
    if step >= 0:
        if os.path.exists(state_file):
            hint = f"the last good state file {state_file} is untouched (resume from it with a lower --lr)"
        else:
            hint = "no state file was written before it"
        raise NonFiniteLoss(f"the training loss became NaN or infinite at step {step}; stopped: {hint}")


@torch.no_grad()
def evaluation_sums(model, batches, sums, n_sums, info, device, dtype):
    """`n_sums` sums over every batch of a split, `sums(model, batch)` giving a batch's as
    a float64 tensor. Each rank takes every world_size-th batch and the sums are reduced
    (on the training device), so every rank gets the single-process result."""
    model.eval()
    total = torch.zeros(n_sums, dtype=torch.float64, device=device)
    for i in logs.progress(range(info.rank, len(batches), info.world_size), unit="batch",
                            desc="evaluating"):
        batch = utils.to_device(batches[i], device)
        with utils.autocast(device, dtype):
            total += sums(model, batch)
    distributed.all_reduce_sum(total, info)
    model.train()
    return total.tolist()


def run(task, model, config, info, device, log, start, flags=None):
    """The run of every task script after its setup: say what trains (`start`: where its
    weights come from), train (resuming from --checkpoint), then test the best model and
    write every output (ending.finish). `config`: the TrainConfig; `flags`: every flag of
    the run, as the Trainer saves them."""
    task_config = task.config
    model_line = (f"{type(model).__name__} {start}: {count_parameters(model) / 1e6:.1f}M "
                  f"parameters, {task_config.nlayers} layers, hidden {task_config.emsize}, "
                  f"vocab {len(task.vocab)}, device {device}, {info.world_size} process(es)")
    if config.evaluate_only:
        log(model_line)
        evaluate_only(task, model, config, info, log)
        return
    loop = Trainer(task, model, config, info, device, log, flags=flags)
    log(model_line)  # after "resumed from ...", which the Trainer says as it loads the state
    if loop.fit():  # stopped by a signal, the state file written
        raise distributed.Stopped(loop.exit_code)
    ending.finish(loop)


def evaluate_only(task, model, config, info, log):
    """--evaluate-only: the model as loaded, on the valid and test splits (--eval-batches
    applies, as the tasks read it), into the log and the metrics log (step 0, epoch 0);
    no other file is written."""
    metrics_log = logs.MetricsLog(config.metrics_file, config.tensorboard)
    for split in ("valid", "test"):
        metrics = task.evaluate(model, split)
        log(f"| evaluation | {logs.format_metrics(split, metrics)}")
        if info.is_main:
            metrics_log.write(logs.evaluation_row(split, metrics, step=0, epoch=0))
    metrics_log.close()
    log(f"wrote {', '.join(metrics_log.files())}")

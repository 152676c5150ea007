"""The training loop of the three tasks: optimizer and schedule, log, metrics, checkpoint,
resume, stop on a signal or a NaN.

A task tells the Trainer what it needs and nothing more:

    task.config, task.vocab           # saved with every state file
    task.train_batches(epoch)         # a data.Batches of the rank's batches of an epoch
    task.loss(model, batch)           # a scalar
    task.evaluate(model, split)       # (loss, score, text): a lower score is better; the
                                      # numbers of text ("valid ppl 12.3") go to the metrics log
    task.save_best(model)             # write the best model so far
"""

import contextlib
import functools
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import checkpoint
import data
import utils
from utils import UserError


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit) and Ctrl-C (SIGINT) set a
    flag; the loop finishes its step, writes the state file and exits. A second Ctrl-C
    stops at once."""

    def __init__(self):
        self.requested = self.interrupted = False
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT):
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: exit 130 now (utils._run_rank)
            self.interrupted = True
            print("\nCtrl-C: stopping after this step to write the state file "
                  "(Ctrl-C again to quit now)", file=sys.stderr, flush=True)
        self.requested = True


# Under DDP the ranks agree on a stop at log and save steps, and at least this often: one
# small collective, not one per step.
SIGNAL_CHECK_EVERY = 50


def sync_stop_flags(first_bad_step, preempted, info):
    """(first non-finite step of any rank or -1, whether any rank was signalled).

    One all_reduce of a tensor on the training device (first_bad_step's): NCCL has no
    collectives for CPU tensors. `first_bad_step` is -1 where the loss stayed finite."""
    if not info.enabled:
        return int(first_bad_step.item()), preempted
    bad = first_bad_step.float()
    flags = torch.stack([torch.full_like(bad, float(preempted)),
                         torch.where(bad < 0, -math.inf, -bad)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    preempted, negative_step = flags.tolist()
    return (int(-negative_step) if math.isfinite(negative_step) else -1), preempted > 0


def rng_state(device):
    """This rank's RNG: the CPU generator, Python's, and its own GPU's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


###############################################################################
# Optimizer and learning-rate schedule
###############################################################################


def param_groups(model, weight_decay):
    """The optimizer's parameter groups. With weight decay, BERT's split: decay on the
    weight matrices (linear layers, embeddings), none on biases and LayerNorm weights (a
    LayerNorm scale decayed toward 0 would shrink its layer's output, not regularize it).
    Without, one group of model.parameters(), as the old example's SGD had."""
    if not weight_decay:
        return [{"params": list(model.parameters()), "weight_decay": 0.0}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            skip = isinstance(module, torch.nn.LayerNorm) or name == "bias"
            (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@functools.cache
def fused_adamw_works(device_type):
    """Whether PyTorch has a fused AdamW kernel for this device type (CUDA; the CPU since
    torch 2.4): tried on one tensor, since it is checked only at the first step. On a CPU
    the fused step measured 0.96-0.99x SGD's time, against 0.79x for the default one."""
    probe = torch.zeros(1, device=device_type, requires_grad=True)
    probe.grad = torch.ones_like(probe)
    try:
        torch.optim.AdamW([probe], fused=True).step()
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return True


def make_optimizer(model, args, device):
    """--optimizer with --lr, --weight-decay, --betas and --eps."""
    groups = param_groups(model, args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr)
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps,
                             fused=fused_adamw_works(device.type) or None)


def lr_factor(step, total_steps, warmup_steps, shape):
    """The multiple of --lr for optimizer step `step` (0 for the first) of `total_steps`:
    linear from 0 over `warmup_steps`, then `shape` ("linear" or "cosine") down to 0 at
    total_steps (transformers' get_linear/cosine_schedule_with_warmup)."""
    if step < warmup_steps:
        return step / warmup_steps
    done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if shape == "linear":
        return max(0.0, 1.0 - done)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0))))


def make_scheduler(optimizer, args, total_steps):
    """plateau: the old example's lr x0.1, stepped by fit after an epoch whose validation
    does not improve. linear / cosine: stepped after every optimizer step."""
    if args.schedule == "plateau":
        return torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.1)
    # A partial, not a lambda: LambdaLR's state_dict keeps it as plain data.
    factor = functools.partial(lr_factor, total_steps=total_steps,
                               warmup_steps=round(args.warmup * total_steps), shape=args.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_batch_groups(batches, size):
    """Consecutive groups of `size` batches (the last may be shorter): one optimizer
    step each (--grad-accum)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


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


class NonFiniteLoss(UserError):
    pass


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the state file was written: exit code 130, as a shell expects."""


class Trainer:
    """The epoch loop of all three tasks (see the module docstring for the task's part)."""

    def __init__(self, task, model, args, info, device, log):
        self.task, self.args, self.info, self.device, self.log = task, args, info, device, log
        self.state = TrainState()
        self.preemption = Preemption()
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
        self.epoch_loss = torch.zeros((), device=device)
        # What every state file holds besides the training state, built once.
        self.extra = {"config": task.config.to_dict(), "vocab": task.vocab.itos,
                      "tokenizer": task.vocab.state()}
        # The defaults are the old example's: plain SGD, lr x0.1 when validation does not improve.
        self.optimizer = make_optimizer(model, args, device)
        self.per_step_schedule = args.schedule != "plateau"
        self.scheduler = make_scheduler(self.optimizer, args, self.total_steps() if
                                        self.per_step_schedule else None)
        self.step_lr = args.lr  # the lr of the last optimizer step, for the logs
        if args.checkpoint != "None":
            self.load_state(checkpoint.load_checkpoint(args.checkpoint, "--checkpoint"), model)
            log(f"resumed from {args.checkpoint} at epoch {self.state.epoch}, "
                f"step {self.state.step_in_epoch} of the epoch ({self.state.global_step} in all)")
        elif info.rank > 0:
            # Every rank built the same initial weights from --seed (DDP checks they agree);
            # from here on each draws its own dropout masks. Rank 0 keeps --seed's stream,
            # so a single-process run is what it always was.
            torch.manual_seed(args.seed + info.rank)
        # Compile the module, then wrap it in DDP (PyTorch's current advice for the pair).
        self.model = torch.compile(model) if args.compile else model
        self.model = utils.wrap_ddp(self.model, device, info)
        self.metrics = utils.MetricsLog(args.metrics_file, args.tensorboard,
                                        append=args.checkpoint != "None")
        self.state_written = False

    def steps_per_epoch(self, n_batches):
        return -(-n_batches // self.args.grad_accum)

    def total_steps(self):
        """Optimizer steps of the whole run: --epochs of them, or --max-steps if fewer."""
        total = self.args.epochs * self.steps_per_epoch(len(self.task.train_batches(1)))
        return min(total, self.args.max_steps) if self.args.max_steps else total

    # -- state file ---------------------------------------------------------
    def save_state(self):
        self.state.epoch_loss_sum = float(self.epoch_loss)
        rng = [rng_state(self.device)]
        if self.info.enabled:  # each rank's own RNG, so that a resume restores every rank's
            rng = [None] * self.info.world_size
            dist.all_gather_object(rng, rng_state(self.device))
        if self.info.is_main:
            utils.atomic_save({
                "kind": "state", "model": utils.unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "train_state": vars(self.state).copy(),
                "rng": rng, "args": vars(self.args).copy(), **self.extra,
                # Which script may resume it (checks.parse_args refuses the others).
                "script": getattr(self.args, "script", None),
            }, self.args.state_file)
            self.state_written = True

    def load_state(self, ckpt, model):
        path = self.args.checkpoint
        if ckpt.get("kind") != "state":
            raise UserError(f"--checkpoint {path}: not a state file")
        checkpoint.load_into(model, ckpt["model"], "--checkpoint", path)
        for flag, old_default in (("optimizer", "sgd"), ("schedule", "plateau")):
            saved = ckpt.get("args", {}).get(flag, old_default)
            if saved != getattr(self.args, flag):
                raise UserError(f"--checkpoint {path} was saved with --{flag} {saved}: its state "
                                f"cannot continue under --{flag} {getattr(self.args, flag)}")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError) as e:  # e.g. --weight-decay 0 <-> not 0: other groups
            raise UserError(f"--checkpoint {path}: its optimizer state does not fit --weight-decay "
                            f"{self.args.weight_decay} ({e})") from None
        # A state saved without fp16 has no scaler state: a fresh scaler starts the run.
        if ckpt["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        rng = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
        if self.info.rank < len(rng):
            set_rng_state(rng[self.info.rank], self.device)
        else:  # more ranks than the run that saved: the new ones start fresh streams
            torch.manual_seed(self.args.seed + self.info.rank)

    def load_best(self, path):
        """After fit: every rank loads the best model rank 0 saved at `path`; returns the
        plain module (no DDP, no compile wrapper) for the final evaluation."""
        utils.barrier(self.info)
        model = utils.unwrap(self.model)
        best = checkpoint.load_checkpoint(path, "best model")["model"]
        checkpoint.load_into(model, best, "best model", path)
        return model

    def files_written(self):
        """The state file and the metrics logs, as 'path (what)', once written."""
        state = [f"{self.args.state_file} (training state)"] if self.state_written else []
        return state + self.metrics.files()

    def log_evaluation(self, split, loss, text):
        """An evaluation's row of the metrics log (rank 0)."""
        if self.info.is_main:
            self.metrics.write({"step": self.state.global_step, "epoch": self.state.epoch,
                                f"{split}_loss": loss, **utils.text_metrics(text, split)})

    # -- loop ---------------------------------------------------------------
    def fit(self):
        """Train until --epochs or --max-steps; returns True when stopped by a signal."""
        args, st = self.args, self.state
        while st.epoch <= args.epochs:
            epoch_start = time.time()
            stopped = self.train_epoch()
            if stopped == "signal":
                return True
            val_loss, score, extra_text = self.task.evaluate(utils.unwrap(self.model), "valid")
            st.val_loss_log.append(val_loss)
            self.log_evaluation("valid", val_loss, extra_text)
            self.log("-" * 89)
            self.log(f"| end of epoch {st.epoch:3d} | time: {time.time() - epoch_start:5.2f}s | "
                     f"valid loss {val_loss:8.5f} | {extra_text}")
            self.log("-" * 89)
            if st.best_score is None or score < st.best_score:
                st.best_score = score
                if self.info.is_main:
                    self.task.save_best(utils.unwrap(self.model))
            elif not self.per_step_schedule:
                self.scheduler.step()  # the old schedule: lr x0.1 when validation does not improve
            st.epoch += 1
            st.step_in_epoch = 0
            self.epoch_loss.zero_()
            self.save_state()
            if stopped == "max_steps":
                break
        return False

    def no_sync(self, last):
        """DDP all-reduces the gradients in every backward: on all but the last batch of
        an optimizer step that would be a collective whose result is not used yet."""
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def step(self, batches):
        """One optimizer step over `batches` (--grad-accum of them, already on the device);
        returns the sum of their losses as a tensor (no host sync).

        Each loss is divided by the number of batches, so that the summed gradients are
        those of one batch of all their sequences."""
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            with self.no_sync(last=i == len(batches) - 1):
                with utils.autocast(self.device, self.args.dtype):
                    loss = self.task.loss(self.model, batch)
                self.scaler.scale(loss / len(batches) if len(batches) > 1 else loss).backward()
            loss_sum += loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_schedule:
            self.scheduler.step()
        return loss_sum

    def train_epoch(self):
        args, st = self.args, self.state
        self.model.train()
        batches = self.task.train_batches(st.epoch)
        window = LogWindow(self.device, len(batches), self.steps_per_epoch(len(batches)))
        self.epoch_loss.fill_(st.epoch_loss_sum)
        first_bad_step = torch.full((), -1, device=self.device)
        loader = data.batch_loader(batches, st.step_in_epoch, args.num_workers,
                                   self.device.type == "cuda")
        bar = utils.progress(total=len(batches), initial=st.step_in_epoch, unit="batch",
                             desc=f"epoch {st.epoch}")
        stopped = None
        for group in micro_batch_groups(loader, args.grad_accum):
            # No .item() here: a host sync every step stalls the GPU. Losses and the
            # first non-finite step are accumulated on the device and read at log time.
            loss_sum = self.step([utils.to_device(batch, self.device) for batch in group])
            bad = ~torch.isfinite(loss_sum)
            first_bad_step = torch.where(bad & (first_bad_step < 0), st.global_step + 1, first_bad_step)
            window.add(loss_sum, group)
            self.epoch_loss += loss_sum
            st.step_in_epoch += len(group)
            st.global_step += 1
            bar.update(len(group))
            stopped = self.after_step(window, first_bad_step)
            if stopped:
                break
        bar.close()
        if stopped == "signal":
            return stopped
        if st.step_in_epoch:
            st.train_loss_log.append(self.epoch_loss.item() / st.step_in_epoch)
        self.epoch_loss.zero_()
        return "max_steps" if (args.max_steps and st.global_step >= args.max_steps) else None

    def after_step(self, window, first_bad_step):
        """Log, save, and stop checks after an optimizer step; returns "signal" or
        "max_steps" to end the epoch, else None."""
        args, st = self.args, self.state
        step_in_epoch = self.steps_per_epoch(st.step_in_epoch)  # optimizer steps
        at_log = step_in_epoch % args.log_interval == 0
        at_save = args.save_every and st.global_step % args.save_every == 0
        at_max = args.max_steps and st.global_step >= args.max_steps
        at_end = st.step_in_epoch == window.n_batches
        # Under DDP every rank must reach the same checks (a collective); alone, a
        # signal is acted on at the next step.
        at_check = at_log or at_save or at_max or at_end or (
            st.global_step % SIGNAL_CHECK_EVERY == 0 if self.info.enabled
            else self.preemption.requested)
        preempted = False
        if at_check:
            bad_step, preempted = sync_stop_flags(first_bad_step, self.preemption.requested,
                                                  self.info)
            self.check_finite(bad_step)
        if at_log:
            self.log_training(window, step_in_epoch)
        if preempted:
            self.save_state()
            self.log(f"stopped by a signal at step {st.global_step}; the state is in "
                     f"{args.state_file}. Resume with: python {os.path.basename(sys.argv[0])} "
                     f"--checkpoint {args.state_file}")
            if self.preemption.interrupted:
                raise Interrupted
            return "signal"
        if at_save:
            self.save_state()
        return "max_steps" if at_max else None

    def log_training(self, window, step_in_epoch):
        """The old example's log line (a "batch" is an optimizer step), and its metrics row."""
        st = self.state
        loss, seconds = window.read_and_reset()
        ms_per_step = seconds * 1000 / window.last_steps
        self.log(f"| epoch {st.epoch:3d} | {step_in_epoch:5d}/{window.n_steps:5d} batches | "
                 f"lr {self.step_lr:05.5f} | ms/batch {ms_per_step:5.2f} | loss {loss:5.2f} | "
                 f"ppl {math.exp(min(loss, 700)):8.2f}")
        if self.info.is_main:
            self.metrics.write({
                "step": st.global_step, "epoch": st.epoch, "loss": loss, "lr": self.step_lr,
                "tokens_per_s": window.last_tokens * self.info.world_size / seconds,
                "ms_per_step": ms_per_step})

    def check_finite(self, step):
        if step >= 0:
            state_file = self.args.state_file
            if os.path.exists(state_file):
                hint = f"the last good state file {state_file} is untouched (resume from it with a lower --lr)"
            else:
                hint = "no state file was written before it"
            raise NonFiniteLoss(f"the training loss became NaN or infinite at step {step}; stopped: {hint}")


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


@torch.no_grad()
def evaluation_sums(model, batches, sums, n_sums, info, device, dtype):
    """`n_sums` sums over every batch of a split, `sums(model, batch)` giving a batch's as
    a float64 tensor. Each rank takes every world_size-th batch and the sums are reduced
    (on the training device), so every rank gets the single-process result."""
    model.eval()
    total = torch.zeros(n_sums, dtype=torch.float64, device=device)
    for i in utils.progress(range(info.rank, len(batches), info.world_size), unit="batch",
                            desc="evaluating"):
        batch = utils.to_device(batches[i], device)
        with utils.autocast(device, dtype):
            total += sums(model, batch)
    utils.all_reduce_sum(total, info)
    model.train()
    return total.tolist()


def train_and_test_encoder(task, model, args, info, device, log, loss_file):
    """What mlm_task.py and ns_task.py share: train, test the best model, then write the
    encoder (--save), the vocab (--save-vocab) and the old example's loss log."""
    trainer = Trainer(task, model, args, info, device, log)
    if trainer.fit():
        return
    model = trainer.load_best(task.full_model_path)
    test_loss, _, text = task.evaluate(model, "test")
    trainer.log_evaluation("test", test_loss, text)
    log("=" * 89)
    log(f"| End of training | test loss {test_loss:{task.loss_format}} | {text}")
    log("=" * 89)
    if info.is_main:
        st = trainer.state
        utils.print_loss_log(loss_file, st.train_loss_log, st.val_loss_log, test_loss, args)
        checkpoint.save_model("encoder", model.bert_model, task.config, task.vocab, args.save)
        checkpoint.save_vocab_copy(task.vocab, args.save_vocab, log)
        trainer.metrics.close()
        files = [f"{args.save} (encoder)", f"{task.full_model_path} (best model)",
                 f"{loss_file} (losses)", f"{args.save_vocab} (vocab)", *trainer.files_written()]
        log(f"wrote {', '.join(files)}")

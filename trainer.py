"""The training loop of the three tasks: log, checkpoint, resume, stop on a signal or a NaN.

A task tells the Trainer what it needs and nothing more:

    task.config, task.vocab           # saved with every state file
    task.train_batches(epoch)         # a data.Batches of the rank's batches of an epoch
    task.loss(model, batch)           # a scalar
    task.evaluate(model, split)       # (loss, score, text): a lower score is better
    task.save_best(model)             # write the best model so far
"""

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


@dataclass
class TrainState:
    """Where training is; saved in the state file, together with model and optimizer."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
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
        # The old example's schedule: plain SGD, lr x0.1 whenever validation does not improve.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=0.1)
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

    def load_state(self, ckpt, model):
        path = self.args.checkpoint
        if ckpt.get("kind") != "state":
            raise UserError(f"--checkpoint {path}: not a state file")
        checkpoint.load_into(model, ckpt["model"], "--checkpoint", path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
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
            self.log("-" * 89)
            self.log(f"| end of epoch {st.epoch:3d} | time: {time.time() - epoch_start:5.2f}s | "
                     f"valid loss {val_loss:8.5f} | {extra_text}")
            self.log("-" * 89)
            if st.best_score is None or score < st.best_score:
                st.best_score = score
                if self.info.is_main:
                    self.task.save_best(utils.unwrap(self.model))
            else:
                self.scheduler.step()  # the old schedule: lr x0.1 when validation does not improve
            st.epoch += 1
            st.step_in_epoch = 0
            self.epoch_loss.zero_()
            self.save_state()
            if stopped == "max_steps":
                break
        return False

    def step(self, batch):
        """One optimizer step; returns the loss as a tensor (no host sync)."""
        with utils.autocast(self.device, self.args.dtype):
            loss = self.task.loss(self.model, batch)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float()

    def train_epoch(self):
        args, st = self.args, self.state
        self.model.train()
        batches = self.task.train_batches(st.epoch)
        n_batches = len(batches)
        total_loss = torch.zeros((), device=self.device)
        self.epoch_loss.fill_(st.epoch_loss_sum)
        first_bad_step = torch.full((), -1, device=self.device)
        logged = 0
        start = time.time()
        loader = data.batch_loader(batches, st.step_in_epoch, args.num_workers,
                                   self.device.type == "cuda")
        for batch in loader:
            # No .item() here: a host sync every step stalls the GPU. Losses and the
            # first non-finite step are accumulated on the device and read at log time.
            loss = self.step(utils.to_device(batch, self.device))
            bad = ~torch.isfinite(loss)
            first_bad_step = torch.where(bad & (first_bad_step < 0), st.global_step + 1, first_bad_step)
            total_loss += loss
            self.epoch_loss += loss
            st.step_in_epoch += 1
            st.global_step += 1
            logged += 1

            at_log = st.step_in_epoch % args.log_interval == 0
            at_save = args.save_every and st.global_step % args.save_every == 0
            at_max = args.max_steps and st.global_step >= args.max_steps
            at_end = st.step_in_epoch == n_batches
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
                cur_loss = total_loss.item() / logged
                elapsed = time.time() - start
                self.log(f"| epoch {st.epoch:3d} | {st.step_in_epoch:5d}/{n_batches:5d} batches | "
                         f"lr {self.scheduler.get_last_lr()[0]:05.5f} | "
                         f"ms/batch {elapsed * 1000 / logged:5.2f} | loss {cur_loss:5.2f} | "
                         f"ppl {math.exp(min(cur_loss, 700)):8.2f}")
                total_loss.zero_()
                logged, start = 0, time.time()
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
            if at_max:
                break
        if st.step_in_epoch:
            st.train_loss_log.append(self.epoch_loss.item() / st.step_in_epoch)
        self.epoch_loss.zero_()
        return "max_steps" if (args.max_steps and st.global_step >= args.max_steps) else None

    def check_finite(self, step):
        if step >= 0:
            state_file = self.args.state_file
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
    for i in range(info.rank, len(batches), info.world_size):
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
    log("=" * 89)
    log(f"| End of training | test loss {test_loss:{task.loss_format}} | {text}")
    log("=" * 89)
    if info.is_main:
        st = trainer.state
        utils.print_loss_log(loss_file, st.train_loss_log, st.val_loss_log, test_loss, args)
        checkpoint.save_model("encoder", model.bert_model, task.config, task.vocab, args.save)
        checkpoint.save_vocab_copy(task.vocab, args.save_vocab, log)
        log(f"wrote {args.save} (encoder), {task.full_model_path} and {loss_file}")

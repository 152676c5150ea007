"""--time-budget: a run that trains for as many optimizer steps as fit in a wall-clock
budget, its warmup and decay spanning them (as Cramming's and academic-budget-bert's
--total_training_time).

The run measures its first steps before training (WARMUP_STEPS untimed, then at least
TIMED_STEPS timed, for MEASURE_SHARE of the budget, at most MAX_TIMED_STEPS), as the
training loop runs them: its loader, and its prefetch thread building the next batches
beside the step (on 2 cores the two compete: steps timed with the batches built in line
ran 12% faster than the hour's loop). A throwaway optimizer takes them; the weights and
random streams are put back, so the training that follows is the one `--max-steps N`
would give. Then one validation, and the
write of a state; fixes the number of steps N that fits in what is left of the budget
once every validation, the test and every save are reserved (those count inside the
budget); says so in one line; and records N in the state file (TrainState.budget). A
resumed run keeps the N of its state file: the same schedule, bitwise; its own setup is
not counted (the state records the time it took to get there). Should the steps
run slower than measured (other work on the machine), training stops early when only
the time of its final validation, test and saves is left, and says so.

The clock starts with the process (args.launched_at; when the flags are parsed for a run
in a process that did something else before, as the tests'), so the setup (imports, the
vocabulary, the token ids) counts too. The Trainer's hooks:

    TimeBudget(config, flags, info, device, log, ckpt)  # before the schedule: a resume's N -> max_steps
    budget.start(trainer)                 # end of __init__: a new run measures and fixes N
    budget.state()                        # into each state file
    budget.out_of_time(step)              # after each step: the safety stop
"""

import argparse
import math
import os
import re
import tempfile
import time

import torch

import utils
from bertkit.files import UserError
from bertkit.training import distributed
from bertkit.training.optimizer import make_optimizer, make_scheduler

UNITS = {"s": 1, "m": 60, "h": 3600}
WARMUP_STEPS = 2  # untimed: the first steps allocate, compile, fill caches
TIMED_STEPS = 5  # at least
MAX_TIMED_STEPS = 50
MEASURE_SHARE = 0.005  # of the budget, spent timing steps (an hour: 18 s)
MARGIN = 0.01  # of the budget, left unplanned


def duration(text):
    """A --time-budget value, `90s`, `60m`, `2h`, `1.5h` (a bare number: seconds), as
    seconds; argparse's one-line error for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text))
    seconds = float(match[1]) * UNITS[match[2] or "s"] if match else 0.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise argparse.ArgumentTypeError(f"{text}: give a duration > 0 such as 90s, 60m, 2h "
                                         "or 1.5h")
    return seconds


def shown(seconds):
    """Seconds as the flag is written: 3600 -> 60m, 90 -> 90s, 5400 -> 90m, 9000 -> 2.5h."""
    if seconds >= 2 * UNITS["h"] and seconds % (UNITS["h"] / 2) == 0:
        return f"{seconds / UNITS['h']:g}h"
    if seconds >= UNITS["m"] and seconds % UNITS["m"] == 0:
        return f"{seconds / UNITS['m']:g}m"
    return f"{seconds:g}s"


def process_started():
    """time.time() when this process started (Linux: /proc), else now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def timed_write(state, beside):
    """Seconds to write `state` as a state file is written (torch.save, fsync) in the
    folder of `beside`, to a temporary file removed after."""
    started = time.perf_counter()
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(beside))) as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


class TimeBudget:
    """The budget of a run (inactive without --time-budget: every hook does nothing)."""

    def __init__(self, config, flags, info, device, log, ckpt=None):
        """`config`: the TrainConfig (its max_steps set to the steps fixed); `flags`: the
        run's, with --time-budget (seconds) and launched_at; `ckpt`: a resume's state."""
        self.config, self.info, self.device, self.log = config, info, device, log
        self.seconds = flags.get("time_budget")
        self.clock = flags.get("launched_at") or time.time()
        saved = ((ckpt or {}).get("train_state") or {}).get("budget") or {}
        self.steps, self.final = saved.get("steps"), saved.get("final", 0.0)
        self.spent_before, self.stop = saved.get("spent", 0.0), saved.get("stop")
        self.timed_steps = TIMED_STEPS  # measure() sets how many it timed
        if self.seconds and self.steps:  # a resume: the schedule of the state file
            config.max_steps = self.steps
        elif self.seconds and ckpt is not None:
            raise UserError(f"--time-budget {shown(self.seconds)}: the run at "
                            f"{config.checkpoint} was started without one, and a resumed run "
                            "keeps its schedule; leave --time-budget out")

    def spent(self):
        """Seconds of the budget spent: by the attempts before this one (at their last
        state) and by this one since its flags were parsed."""
        return self.spent_before + time.time() - self.clock

    def state(self):
        if not self.seconds:
            return None
        return {"seconds": self.seconds, "steps": self.steps, "final": self.final,
                "spent": self.spent(), "stop": self.stop}

    def start(self, trainer):
        """After the Trainer is built: a new run measures and fixes its steps, and the
        schedule is made again for them; a resumed one says what it continues."""
        if not self.seconds:
            return
        if self.steps:  # a resume: its setup is not counted, the state's time to get there is
            self.clock = time.time()
            self.log(f"--time-budget {shown(self.seconds)}: continuing the schedule of "
                     f"{self.steps} optimizer steps fixed at the start of the run "
                     f"({self.spent_before:.0f} s of it spent before this resume)")
            if self.stop:  # stopped early (out_of_time): it trains no more
                self.config.max_steps = self.stop
            return
        step, evaluation, save = self.measure(trainer)
        self.steps = self.fit(trainer, step, evaluation, save)
        self.config.max_steps = self.steps
        trainer.scheduler = make_scheduler(trainer.optimizer, self.config, trainer.total_steps())

    def measure(self, trainer):
        """(seconds of an optimizer step, of a validation, of a state write), the slowest
        rank's: WARMUP_STEPS steps, then the timed ones (_timed_enough) on a throwaway
        optimizer, then one validation; the model's weights and the random streams put
        back."""
        config, device = self.config, trainer.device
        model = distributed.unwrap(trainer.model)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rng, scaler = utils.rng_state(device), trainer.scaler.state_dict()
        kept = trainer.optimizer, trainer.scheduler
        trainer.optimizer = make_optimizer(model, config, device)
        trainer.scheduler = make_scheduler(trainer.optimizer, config, 1 << 30)
        groups = _loop_groups(trainer)
        try:
            steps, last = [], time.perf_counter()
            for group in groups:  # from one step's end to the next's: the loop's pace
                # The item: the step's work done (a GPU's too).
                trainer.step([utils.to_device(batch, device) for batch in group]).item()
                now = time.perf_counter()
                steps.append(now - last)
                last = now
                if self._timed_enough(steps[WARMUP_STEPS:], device):
                    break
            groups.close()  # stops the prefetch thread before the validation
            started = time.perf_counter()
            trainer.task.evaluate(model, "valid")
            evaluation = time.perf_counter() - started
            save = timed_write({"model": model.state_dict(),
                                "optimizer": trainer.optimizer.state_dict()}, config.state_file)
        finally:
            groups.close()
            trainer.optimizer, trainer.scheduler = kept
            model.load_state_dict(weights)
            utils.set_rng_state(rng, device)
            trainer.scaler.load_state_dict(scaler)
            trainer.step_lr = config.lr
            # Read and reset: a classifier's first training line counts no measured step.
            trainer.run_log.training_metrics(0.0)
            model.train()
        self.timed_steps = len(steps) - WARMUP_STEPS
        if self.timed_steps < 1:
            raise UserError(f"--time-budget {shown(self.seconds)}: the training split has "
                            "no batch to time a step on")
        times = torch.tensor([sum(steps[WARMUP_STEPS:]) / self.timed_steps, evaluation, save],
                             dtype=torch.float64, device=device)
        return distributed.all_reduce_max(times, self.info).tolist()

    def _timed_enough(self, timed, device):
        """Whether the steps timed so far (seconds each) measure the pace: at least
        TIMED_STEPS of them over MEASURE_SHARE of the budget, or MAX_TIMED_STEPS. Every
        rank stops measuring at the same step (their steps are collectives)."""
        enough = len(timed) >= MAX_TIMED_STEPS or (
            len(timed) >= TIMED_STEPS and sum(timed) >= MEASURE_SHARE * self.seconds)
        return distributed.any_rank(enough, self.info, device)

    def fit(self, trainer, step, evaluation, save):
        """The most optimizer steps N such that N steps, the validations and state writes
        among them and after them, the test and the final writes end within the budget
        (less MARGIN); at most --max-steps and --epochs' steps. One line says why."""
        config = self.config
        per_epoch = trainer.steps_per_epoch(len(trainer.task.train_batches(1)))
        self.final = 2 * evaluation + 4 * save  # the last validation, the test, the writes
        left = self.seconds * (1 - MARGIN) - self.spent()

        def reserved(n):
            validations = n // per_epoch + (n // config.eval_every if config.eval_every else 0)
            writes = n // per_epoch + (n // config.save_every if config.save_every else 0)
            return validations * (evaluation + save) + writes * save + self.final

        low, high = 0, max(0, int(left / step))
        while low < high:  # the largest n with n * step + reserved(n) <= left
            middle = (low + high + 1) // 2
            low, high = (middle, high) if middle * step + reserved(middle) <= left else (
                low, middle - 1)
        budget = f"--time-budget {shown(self.seconds)}"
        if low < 1:
            raise UserError(
                f"{budget}: shorter than one step of this run: a step takes {step:.2f} s, "
                f"{self.spent():.0f} s are spent (setup, measurement) and the validation, "
                f"test and saves need {reserved(1):.1f} s; give a longer budget")
        limits = {"--epochs": config.epochs * per_epoch, "--max-steps": config.max_steps}
        capped = [(n, flag) for flag, n in limits.items() if n and n < low]
        fixed, why = min(capped) if capped else (low, None)
        ends = f"; {why} ends it first, at {fixed}" if why else ""
        self.log(f"{budget}: {low} optimizer steps fit{ends}, the warmup and decay span "
                 f"{fixed} steps ({step:.3f} s a step, measured over {self.timed_steps} steps "
                 f"after {WARMUP_STEPS}; {self.spent():.0f} s spent before training; "
                 f"{reserved(fixed):.0f} s reserved for validations, the test and saves)")
        return fixed

    def out_of_time(self, step):
        """After optimizer step `step`: whether training must stop now to leave its final
        validation, test and saves inside the budget (steps slower than measured); the
        same answer on every rank (checked every SIGNAL_CHECK_EVERY steps under DDP)."""
        if not self.seconds or not self.steps or step >= self.steps:
            return False
        if self.info.enabled and step % distributed.SIGNAL_CHECK_EVERY:
            return False
        late = self.spent() + self.final > self.seconds
        if self.info.enabled:  # no host sync otherwise
            late = distributed.all_reduce_max(torch.tensor(float(late), device=self.device),
                                              self.info).item()
        if not late:
            return False
        self.log(f"--time-budget {shown(self.seconds)}: the steps ran slower than measured; "
                 f"training stops at step {step} of {self.steps} to leave its final "
                 f"validation, test and saves inside the budget")
        self.config.max_steps = self.stop = step
        return True


def _loop_groups(trainer):
    """The first epoch's optimizer-step groups of batches as the training loop gets them
    (Trainer.step_groups: its loader and prefetch thread), from the start again should a
    small epoch run out; close() stops the thread."""
    batches = trainer.task.train_batches(1)
    while len(batches):
        with trainer.step_groups(batches, 0) as groups:
            yield from groups

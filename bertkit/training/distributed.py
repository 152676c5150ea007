"""Distributed launch and the collectives the tasks use: one process, torchrun, srun, or
locally spawned ranks, each a DistInfo; errors of any rank reported in one line; a stop by
a signal (Preemption), its exit code, and SLURM's requeue.

    launch(run, settings)   # run(info) on every rank; settings: a Launch
"""

import contextlib
import datetime
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

import utils
from bertkit.files import UserError
from bertkit.training import logs


@dataclass
class Launch:
    """How a run's processes start: its launch flags (bertkit/flags.py maps them)."""

    parallel: str = "None"  # None: one process; DDP: torchrun's, srun's or spawned ranks
    world_size: int = 8  # ranks to spawn for DDP without a launcher (at most the GPUs)
    device: str = "auto"  # auto and cuda join NCCL's group, and spawn a rank per GPU
    no_progress: bool = False  # no progress bars (rank 0 shows them on a terminal)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self):
        return self.rank == 0


def expand_nodelist(nodelist):
    """SLURM's compressed host list to hosts: 'a[01-03,07],b' -> a01 a02 a03 a07 b."""
    hosts = []
    for prefix, ranges, _ in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?(,|$)", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def slurm_env(environ, gpus_per_node):
    """Rank layout under srun. Returns (procs_to_spawn_per_task, first_rank, world_size,
    master_addr, master_port) from SLURM's variables.

    One task per node with several GPUs: the task spawns a process per GPU (the old
    example's layout). One task per GPU (or per CPU process): each task is one rank."""
    # The job step's own layout (a step may run on a subset of the job's nodes), falling
    # back to the job's for an srun older than the STEP variables.
    def first(*names, default=None):
        return next((environ[n] for n in names if n in environ), default)

    ntasks = int(first("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    procid = int(environ["SLURM_PROCID"])
    nnodes = int(first("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
                       default=ntasks))
    per_task = gpus_per_node if (ntasks == nnodes and gpus_per_node > 1) else 1
    master_addr = expand_nodelist(first("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"))[0]
    # Two steps of one job (run at once) need two ports: the step id is in the port.
    job, step = int(environ.get("SLURM_JOB_ID", 0)), int(environ.get("SLURM_STEP_ID", 0) or 0)
    port = int(environ.get("MASTER_PORT") or 10000 + (job * 16 + step) % 50000)
    return per_task, procid * per_task, ntasks * per_task, master_addr, port


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run, settings):
    """Run run(dist_info) in this process, or in one process per rank (`settings`: a
    Launch).

    --parallel None: one process. --parallel DDP: join torchrun's group (RANK,
    WORLD_SIZE set), or derive the group from SLURM's variables under srun, or else
    spawn --world_size local processes."""
    if settings.parallel in (None, "None"):
        return _run_rank(run, settings, DistInfo(), None)
    if settings.parallel != "DDP":
        _fail(f"--parallel {settings.parallel!r}: use None or DDP")
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        return _run_rank(run, settings, info, "env://")
    gpus = torch.cuda.device_count() if settings.device in ("auto", "cuda") else 0
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and (
            "SLURM_STEP_NODELIST" in env or "SLURM_JOB_NODELIST" in env):
        per_task, first_rank, world, addr, port = slurm_env(env, gpus)
        local0 = int(env.get("SLURM_LOCALID", 0)) if per_task == 1 else 0
        init = f"tcp://{addr}:{port}"
        if per_task == 1:
            return _run_rank(run, settings, DistInfo(first_rank, world, local0), init)
        return _spawn(run, settings, [DistInfo(first_rank + i, world, i) for i in range(per_task)], init)
    world = settings.world_size
    if gpus:
        world = min(world, gpus)
    init = f"tcp://127.0.0.1:{_free_port()}"
    return _spawn(run, settings, [DistInfo(i, world, i) for i in range(world)], init)


def _spawn(run, settings, infos, init):
    import torch.multiprocessing as mp

    context = mp.spawn(_spawned, args=(run, settings, infos, init), nprocs=len(infos), join=False)

    def forward(signum, frame):  # preemption signals reach this parent: pass them on
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, forward)
    # Ctrl-C reaches every process of the terminal's group: the ranks stop by themselves
    # (after writing the state file; at once on a second Ctrl-C) and this parent waits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        # The failing rank already printed its error; join stopped the others.
        sys.exit(e.exit_code if e.exit_code and e.exit_code > 0 else 1)
    except mp.ProcessRaisedException:
        sys.exit(1)


def _spawned(index, run, settings, infos, init):
    _run_rank(run, settings, infos[index], init)


# The process group's timeout bounds every collective. Rank 0 alone downloads and
# tokenizes a corpus (WikiText-103, BookCorpus, EnWik9) while the others wait at a barrier,
# which can outlast NCCL's default of 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


# Every rank of a torchrun start reaches the process group within seconds of the others: a
# rank that waits longer for its peers there stops (torchrun then restarts them all).
START_TIMEOUT = datetime.timedelta(minutes=10)


class Stopped(Exception):
    """A run stopped by a signal, its state file written: the process exits with `code`
    (exit_code_after: 128 + the signal's number, or 0 once requeued)."""

    def __init__(self, code):
        super().__init__(f"stopped, exit code {code}")
        self.code = code


def _run_rank(run, settings, info, init_method):
    # Bars from rank 0 only; None leaves the choice to whether stderr is a terminal.
    logs.set_progress(False if settings.no_progress or not info.is_main else None)
    stopped = None
    try:
        if info.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # Local CPU processes share the cores (torchrun sets OMP_NUM_THREADS itself).
            torch.set_num_threads(max(1, utils.available_cpus() // info.world_size))
        if init_method is not None:
            _init_process_group(settings.device, info, init_method)
        try:
            try:
                run(info)
            except Stopped as e:  # every rank stops at the same step (Preemption)
                stopped = e
            if dist.is_initialized():
                # Rank 0 may still be writing files: no rank tears the group down while
                # another still uses it (gloo aborts the process when that happens).
                dist.barrier()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except UserError as e:
        # Every rank meets the same bad input: rank 0 says it.
        _fail(str(e), show=info.is_main)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        if info.world_size > 1:
            _report_rank_failure(e, info)
            os._exit(1)  # do not wait in collectives that will never complete
        raise
    if stopped is not None:
        sys.exit(stopped.code)


def _init_process_group(device, info, init_method):
    nccl = torch.cuda.is_available() and device in ("auto", "cuda")
    store = _restart_safe_store(info) if init_method == "env://" else None
    dist.init_process_group(
        "nccl" if nccl else "gloo", init_method=None if store else init_method, store=store,
        rank=info.rank, world_size=info.world_size, timeout=COLLECTIVE_TIMEOUT,
        # Binds the group to this rank's GPU (NCCL's communicators are per device).
        device_id=torch.device("cuda", utils.cuda_index(info.local_rank)) if nccl else None)


###############################################################################
# torchrun's restarts: a store namespace of their own for each start of the ranks
###############################################################################


def _restart_safe_store(info):
    """The store the process group meets in, under torchrun: torchrun's own store (its
    agent's, at MASTER_ADDR:MASTER_PORT), which outlives the ranks and so still holds the
    keys of the group of the ranks it started before a restart (torch's env:// reads them:
    gloo then connects to the addresses of dead ranks, pytorch issue 135712). The group
    meets under a namespace fresh for each start instead. Not torchrun's restart count:
    each node's agent counts its own restarts, and they differ. None when not under
    torchrun's agent (env:// as torch does it)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          info.world_size, is_master=False, timeout=START_TIMEOUT)
    return dist.PrefixStore(f"bert/start/{start_token(store, info, START_TIMEOUT)}/", store)


def start_token(store, info, timeout, poll_seconds=0.05):
    """A token every rank of this start agrees on and no earlier start used: rank 0 makes
    it and gives it to each rank that asks under a name of its own (a random `hello`), so
    that the answer cannot be one left by an earlier start. Every wait is bounded by
    `timeout`."""
    if info.rank > 0:
        hello = uuid.uuid4().hex
        store.set(f"bert/hello/{info.rank}", hello)
        store.wait([f"bert/answer/{hello}"], timeout)
        token = store.get(f"bert/answer/{hello}").decode()
        store.set(f"bert/joined/{token}/{info.rank}", "1")
        return token
    token, waiting = uuid.uuid4().hex, set(range(1, info.world_size))
    deadline = time.monotonic() + timeout.total_seconds()
    while waiting:
        for rank in sorted(waiting):
            if store.check([f"bert/joined/{token}/{rank}"]):
                waiting.discard(rank)
            elif store.check([f"bert/hello/{rank}"]):  # maybe an earlier start's: answered
                hello = store.get(f"bert/hello/{rank}").decode()  # too, and never read
                store.set(f"bert/answer/{hello}", token)
        if waiting and time.monotonic() > deadline:
            raise RuntimeError(f"rank(s) {sorted(waiting)} did not join the process group "
                               f"within {timeout}")
        if waiting:
            time.sleep(poll_seconds)
    return token


def _report_rank_failure(error, info):
    frames = traceback.extract_tb(error.__traceback__)
    # A collective fails inside torch.distributed, or inside backward (DDP's gradient
    # all-reduce), where only the message names the backend.
    in_collective = any("torch/distributed/" in f.filename.replace(os.sep, "/")
                        for f in frames[-3:])
    if in_collective or isinstance(error, getattr(dist, "DistError", ())) or any(
            name in str(error) for name in ("/gloo/", "NCCL")):
        # Either a peer died (it printed its own error) or the collective itself is wrong
        # here: the error's own words tell which, so every rank prints them.
        summary = " ".join(str(error).split())[:500]
        report = (f"[rank {info.rank}] stopped: a collective failed: {type(error).__name__}: "
                  f"{summary}\n")
    else:
        report = f"[rank {info.rank}] {''.join(traceback.format_exception(error))}"
    print(report, file=sys.stderr, end="", flush=True)


def _fail(message, show=True):
    if show:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def all_reduce_sum(tensor, info):
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor, info):
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def unwrap(model):
    """The plain module inside DDP and torch.compile wrappers (whose state dict keys
    carry `module.` / `_orig_mod.` prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def wrap_ddp(model, device, info):
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model, last):
    """DDP all-reduces the gradients in every backward: on all but the `last` batch of an
    optimizer step that would be a collective whose result is not used yet (a model
    without DDP has no such collective)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def barrier(info):
    if info.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(info):
    """Rank 0 runs the block first (downloads, tokenizes, writes caches); the others then
    run it too and find the files ready."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


###############################################################################
# Preemption: a signal, then every rank stops at the same step
###############################################################################


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit) and Ctrl-C (SIGINT) set a
    flag; the loop finishes its step, writes the state file and exits with 128 + the
    signal's number (143, 138, 130). A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = 0  # the first signal received, 0 for none
        self.interrupted = False  # Ctrl-C once
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT):
            if sig is not None:
                signal.signal(sig, self._handle)

    @property
    def requested(self):
        return self.signal != 0

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C: exit 130 now (distributed._run_rank)
            self.interrupted = True
            print("\nCtrl-C: stopping after this step to write the state file "
                  "(Ctrl-C again to quit now)", file=sys.stderr, flush=True)
        self.signal = self.signal or signum


# Under DDP the ranks agree on a stop at log and save steps, and at least this often: one
# small collective, not one per step.
SIGNAL_CHECK_EVERY = 50


def sync_stop_flags(first_bad_step, stop_signal, info):
    """(first non-finite step of any rank or -1, the signal that stops the run: the
    highest number any rank received, 0 for none), the same on every rank.

    One all_reduce of a tensor on the training device (first_bad_step's): NCCL has no
    collectives for CPU tensors. `first_bad_step` is -1 where the loss stayed finite."""
    if not info.enabled:
        return int(first_bad_step.item()), stop_signal
    bad = first_bad_step.float()
    flags = torch.stack([torch.full_like(bad, float(stop_signal)),
                         torch.where(bad < 0, -math.inf, -bad)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop_signal, negative_step = flags.tolist()
    return (int(-negative_step) if math.isfinite(negative_step) else -1), int(stop_signal)


def any_rank(flag, info, device):
    """Whether `flag` is true on any rank (a collective: every rank calls it)."""
    if not info.enabled:
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item() > 0


def launcher_rank(environ=os.environ):
    """This process's rank as its launcher set it, before any process group: torchrun's
    RANK, srun's SLURM_PROCID, else 0. For lines printed once, before launch."""
    return int(environ.get("RANK") or environ.get("SLURM_PROCID") or 0)


###############################################################################
# SLURM's requeue (--slurm-requeue)
###############################################################################


def slurm_job_id(environ=os.environ):
    """The id `scontrol requeue` takes for this job (an array task's own), None outside
    SLURM."""
    if "SLURM_ARRAY_JOB_ID" in environ and "SLURM_ARRAY_TASK_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def check_slurm_requeue():
    """--slurm-requeue, before any work: a SLURM job to requeue, and scontrol to do it."""
    if slurm_job_id() is None:
        raise UserError("--slurm-requeue: not running under SLURM (no SLURM_JOB_ID): nothing "
                        "to requeue; leave the flag out outside sbatch and srun")
    if shutil.which("scontrol") is None:
        raise UserError("--slurm-requeue: scontrol is not on the PATH, so the job cannot be "
                        "requeued")


def requeue_slurm_job(log):
    """`scontrol requeue` of this job (rank 0, after the state file is written): SLURM then
    stops the job and queues it again; it resumes with --checkpoint auto. Whether it worked."""
    job = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"scontrol requeue {job} failed: {e}")
        return False
    if result.returncode != 0:
        detail = " ".join((result.stderr or result.stdout).split())[:200]
        log(f"scontrol requeue {job} failed (exit code {result.returncode}): {detail}")
        return False
    log(f"requeued SLURM job {job}: it starts again and resumes with --checkpoint auto")
    return True


def exit_code_after(signum, slurm_requeue, info, device, log):
    """The exit code of a run stopped by `signum`, its state written (every rank calls
    this): 0 once rank 0 requeued the SLURM job (--slurm-requeue; SIGTERM, SIGUSR1), else
    128 + signum (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C), so that a scheduler
    or an `afterok` chain does not take a stopped run for a finished one."""
    requeued = False
    if slurm_requeue and signum != signal.SIGINT:
        requeued = any_rank(info.is_main and requeue_slurm_job(log), info, device)
    return 0 if requeued else 128 + signum

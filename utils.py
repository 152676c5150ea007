"""What the three task scripts share: device and precision, distributed setup, flags,
logging, and atomic file writes. (Checkpoints: checkpoint.py; the loop: trainer.py.)"""

import contextlib
import datetime
import importlib.util
import json
import os
import re
import signal
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input (a flag, a file): reported as one line `error: ...`, exit code 2."""


###############################################################################
# Device and precision
###############################################################################


def cuda_index(local_rank):
    """The GPU of a local rank. Under `srun --gpus-per-task=1` each task sees one GPU
    (index 0) whatever its SLURM_LOCALID: hence the modulo."""
    return local_rank % torch.cuda.device_count()


def get_device(name, local_rank=0):
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
        device = torch.device("cuda", cuda_index(local_rank))
        torch.cuda.set_device(device)
        # TF32 tensor cores for fp32 matmuls (Ampere and later): ~10-bit mantissa products
        # accumulated in fp32, several times faster; the precision BERT trains fine in.
        torch.set_float32_matmul_precision("high")
        return device
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    return torch.device(name)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(device, dtype):
    """Refuse, before any work, a --dtype the device cannot run natively."""
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use bf16 on the CPU")
    if (dtype == "bf16" and device.type == "cuda"
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise UserError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                        "(it would run emulated, slower than fp32); use --dtype fp16")


def setup_device(args, info):
    """The rank's device, its precision checked (see check_precision)."""
    device = get_device(args.device, info.local_rank)
    check_precision(device, args.dtype)
    return device


def autocast(device, dtype):
    """One mixed-precision context for every forward pass; fp32 is a no-op."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def available_cpus():
    """The CPUs this process may run on: SLURM and taskset restrict it below cpu_count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def to_device(batch, device):
    # non_blocking pairs with the DataLoader's pinned memory on CUDA.
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


###############################################################################
# Distributed
###############################################################################


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


def launch(main, args):
    """Run main(args, dist_info) in this process, or in one process per rank.

    --parallel None: one process. --parallel DDP: join torchrun's group (RANK,
    WORLD_SIZE set), or derive the group from SLURM's variables under srun, or else
    spawn --world_size local processes."""
    if args.parallel in (None, "None"):
        return _run_rank(main, args, DistInfo(), None)
    if args.parallel != "DDP":
        _fail(f"--parallel {args.parallel!r}: use None or DDP")
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        return _run_rank(main, args, info, "env://")
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and (
            "SLURM_STEP_NODELIST" in env or "SLURM_JOB_NODELIST" in env):
        per_task, first_rank, world, addr, port = slurm_env(env, gpus)
        local0 = int(env.get("SLURM_LOCALID", 0)) if per_task == 1 else 0
        init = f"tcp://{addr}:{port}"
        if per_task == 1:
            return _run_rank(main, args, DistInfo(first_rank, world, local0), init)
        return _spawn(main, args, [DistInfo(first_rank + i, world, i) for i in range(per_task)], init)
    world = args.world_size
    if gpus:
        world = min(world, gpus)
    init = f"tcp://127.0.0.1:{_free_port()}"
    return _spawn(main, args, [DistInfo(i, world, i) for i in range(world)], init)


def _spawn(main, args, infos, init):
    import torch.multiprocessing as mp

    context = mp.spawn(_spawned, args=(main, args, infos, init), nprocs=len(infos), join=False)

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


def _spawned(index, main, args, infos, init):
    _run_rank(main, args, infos[index], init)


# The process group's timeout bounds every collective. Rank 0 alone downloads and
# tokenizes a corpus (WikiText-103, BookCorpus, EnWik9) while the others wait at a barrier,
# which can outlast NCCL's default of 10 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def _run_rank(main, args, info, init_method):
    # Bars from rank 0 only; None leaves the choice to whether stderr is a terminal.
    set_progress(False if getattr(args, "no_progress", False) or not info.is_main else None)
    try:
        if info.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # Local CPU processes share the cores (torchrun sets OMP_NUM_THREADS itself).
            torch.set_num_threads(max(1, available_cpus() // info.world_size))
        if init_method is not None:
            nccl = torch.cuda.is_available() and args.device in ("auto", "cuda")
            dist.init_process_group(
                "nccl" if nccl else "gloo", init_method=init_method, rank=info.rank,
                world_size=info.world_size, timeout=COLLECTIVE_TIMEOUT,
                # Binds the group to this rank's GPU (NCCL's communicators are per device).
                device_id=torch.device("cuda", cuda_index(info.local_rank)) if nccl else None)
        try:
            main(args, info)
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


def _report_rank_failure(error, info):
    frames = traceback.extract_tb(error.__traceback__)
    if any("torch/distributed/" in f.filename.replace(os.sep, "/") for f in frames[-3:]):
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
# Command line
###############################################################################


def add_common_flags(parser, **defaults):
    """Flags shared by the three scripts; each script passes its own defaults."""
    d = defaults
    parser.add_argument("--lr", type=float, default=d["lr"], help=f"initial learning rate (default {d['lr']})")
    parser.add_argument("--clip", type=float, default=d["clip"],
                        help=f"max gradient norm (default {d['clip']})")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help=f"upper epoch limit (default {d['epochs']})")
    parser.add_argument("--batch_size", type=int, default=d["batch_size"], metavar="N",
                        help=f"sequences per batch and per process (default {d['batch_size']})")
    parser.add_argument("--bptt", type=int, default=d["bptt"],
                        help=f"sequence length in tokens, <cls> included (default {d['bptt']})")
    parser.add_argument("--seed", type=int, default=d["seed"], help=f"random seed (default {d['seed']})")
    parser.add_argument("--log-interval", type=int, default=d["log_interval"], metavar="N",
                        help="print the training loss every N optimizer steps (batches when "
                             f"--grad-accum is 1) (default {d['log_interval']})")
    parser.add_argument("--checkpoint", type=str, default="None",
                        help="resume from this state file (see --state-file); the flags saved in it "
                             "apply unless given again (default None)")
    parser.add_argument("--save", type=str, default=d["save"], help=f"where to write the model (default {d['save']})")
    parser.add_argument("--save-vocab", type=str, default="bert_vocab.pt",
                        help="vocab file. mlm_task: reused if built from the same dataset and "
                             "--min-freq, else built there; ns/qa_task: a copy of the checkpoint's "
                             "vocab is written there (default bert_vocab.pt)")
    parser.add_argument("--parallel", type=str, default="None", choices=["None", "DDP"],
                        help="None: one process; DDP: DistributedDataParallel under torchrun, srun, "
                             "or --world_size local processes (default None)")
    parser.add_argument("--world_size", type=int, default=8,
                        help="processes to spawn for --parallel DDP without a launcher (default 8; "
                             "at most the number of GPUs)")
    parser.add_argument("--data-dir", type=str, default=".data",
                        help="folder of the datasets, downloaded there when absent (default .data)")
    parser.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto: cuda, else mps, else cpu (default auto)")
    parser.add_argument("--dtype", type=str, default="fp32", choices=list(DTYPES),
                        help="autocast precision: fp32, bf16 (CPU or recent GPUs), fp16 (GPU, with a "
                             "gradient scaler) (default fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default off)")
    parser.add_argument("--max-steps", type=int, default=0, metavar="N",
                        help="stop after N optimizer steps, then validate and test (default 0: no limit)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes building batches (default 0: in the main process)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="also write the state file every N steps (default 0: at epoch ends only)")
    parser.add_argument("--state-file", type=str, default=d["state_file"],
                        help=f"full training state for --checkpoint, written atomically (default {d['state_file']})")
    add_optimizer_flags(parser)
    # <task>_state.pt -> <task>_metrics.jsonl: each script names its files once.
    metrics_file = d["state_file"].replace("_state.pt", "_metrics.jsonl")
    parser.add_argument("--metrics-file", type=str, default=metrics_file,
                        help="JSON lines, one per --log-interval (step, epoch, loss, lr, tokens_per_s) "
                             f"and one per evaluation (its metrics) (default {metrics_file})")
    parser.add_argument("--tensorboard", type=str, default=None, metavar="DIR",
                        help="also write the metrics as TensorBoard events in DIR (needs the "
                             "tensorboard package) (default: none)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: shown when stderr is a terminal)")


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("plateau", "linear", "cosine")


def add_optimizer_flags(parser):
    """The optimizer and the schedule. The defaults are the old example's (plain SGD, lr x0.1
    when validation does not improve), so its commands mean what they meant."""
    parser.add_argument("--optimizer", type=str, default="sgd", choices=OPTIMIZERS,
                        help="sgd: plain SGD (the old example's); adamw: AdamW, fused kernels where "
                             "PyTorch has them for the device (default sgd)")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="weight decay per unit of lr, never on biases and LayerNorm weights "
                             "(adamw: decoupled; sgd: L2, added to the gradient) (default 0)")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                        help="adamw: decay rates of the gradient's moving averages (default "
                             "0.9 0.999, PyTorch's; RoBERTa uses 0.9 0.98)")
    parser.add_argument("--eps", type=float, default=1e-8,
                        help="adamw: added to the denominator (default 1e-8; RoBERTa 1e-6)")
    parser.add_argument("--schedule", type=str, default="plateau", choices=SCHEDULES,
                        help="plateau: lr x0.1 after an epoch whose validation does not improve (the "
                             "old example's); linear, cosine: per optimizer step, from --lr down to 0 "
                             "at the last step of the run (default plateau)")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="F",
                        help="linear and cosine: the fraction of all optimizer steps over which the "
                             "lr rises linearly from 0 to --lr (default 0)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N",
                        help="batches per optimizer step, their gradients summed: the effective "
                             "batch is batch_size x N x processes; --max-steps, --log-interval and "
                             "--save-every count optimizer steps (default 1)")


def check_training_flags(args):
    """UserError for a bad combination of the optimizer, schedule and metrics flags: called
    by checks.parse_args, before any work."""
    # Names and value ranges are in checks.RULES; here what depends on two flags or the machine.
    if args.warmup and args.schedule == "plateau":
        raise UserError("--warmup needs --schedule linear or cosine (plateau's lr changes only "
                        "at epoch ends)")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")


def add_dataset_flag(parser, default):
    parser.add_argument("--dataset", type=str, default=default,
                        help="WikiText2, WikiText103, EnWik9, BookCorpus, or a folder of text files "
                             f"(default {default})")


MODEL_FLAGS = ("emsize", "nhid", "nlayers", "nhead", "dropout")


def add_model_flags(parser, **fresh):
    """Architecture flags. They default to None: a script that starts from --bert-model
    takes the checkpoint's (a value given that contradicts it is an error); mlm_task.py,
    which can also start from scratch, passes the sizes of a `fresh` model for the help."""
    helps = {"emsize": "hidden size", "nhid": "feed-forward size", "nlayers": "encoder layers",
             "nhead": "attention heads", "dropout": "dropout probability"}
    for name in MODEL_FLAGS:
        shown = "from --bert-model"
        if name in fresh:
            shown = f"{fresh[name]}, or from --bert-model when given"
        parser.add_argument(f"--{name}", type=float if name == "dropout" else int, default=None,
                            help=f"{helps[name]} (default {shown})")


def apply_model_flags(config, args, source):
    """Raise if an architecture flag disagrees with `config` (read from checkpoint `source`).
    --dropout is not architecture: when given, it replaces the checkpoint's in `config`."""
    for name in MODEL_FLAGS:
        given = getattr(args, name, None)
        if name != "dropout" and given is not None and given != getattr(config, name):
            raise UserError(f"--{name} {given} does not fit {source}, whose model has "
                            f"{name} {getattr(config, name)}; leave the flag out to use the checkpoint's")
    if getattr(args, "dropout", None) is not None:
        config.dropout = args.dropout


###############################################################################
# Logging
###############################################################################


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


def progress(iterable=None, total=None, desc=None, unit="it", **kwargs):
    """tqdm(iterable, ...) with its rate and ETA on stderr, or the iterable itself (with
    tqdm's update/close doing nothing) when bars are off or tqdm is not installed."""
    if _progress["enabled"] is None:
        _progress["enabled"] = sys.stderr.isatty()
    if not _progress["enabled"]:
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


def text_metrics(text, split):
    """{name: number} of a task's evaluation text ('valid ppl   665.14', 'exact 50.00% |
    f1 60.00%'), each name starting with the split: the numbers the log line shows, for
    the metrics log, with no second way for a task to report them."""
    metrics = {}
    for name, value in re.findall(r"([A-Za-z][A-Za-z0-9 ]*?)\s+(-?[0-9.]+(?:e[-+]?[0-9]+)?)%?",
                                  text):
        name = "_".join(name.split())
        metrics[name if name.startswith(split) else f"{split}_{name}"] = float(value)
    return metrics


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


def print_loss_log(path, train_loss, val_loss, test_loss, args):
    """The old example's <task>_loss.txt: the flags, then losses per epoch."""
    lines = [f"{k}:    {v}" for k, v in vars(args).items()]
    lines += [f"epoch {i:3d} | train loss {v:8.5f}" for i, v in enumerate(train_loss, 1)]
    lines += [f"epoch {i:3d} | val loss {v:8.5f}" for i, v in enumerate(val_loss, 1)]
    lines.append(f"test loss {test_loss:8.5f}")
    atomic_write_text(path, "\n".join(lines) + "\n")


###############################################################################
# Checkpoints
###############################################################################


_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(UserError, OSError):
    """A file could not be written (full disk, permissions): one line naming it. Still an
    OSError, for callers that carry on without the file (the token cache)."""


def _atomic_write(path, write):
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any point leaves either the old file or the new one, never half of one,
    and a failure leaves no temporary file."""
    path = os.fspath(path)
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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


def atomic_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))

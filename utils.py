"""What the three task scripts share: device, distributed setup, checkpoints, logging,
and the training loop with its resume / preemption / NaN handling."""

import argparse
import contextlib
import copy
import math
import os
import random
import re
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input (a flag, a file): reported as one line `error: ...`, exit code 2."""


###############################################################################
# Device and precision
###############################################################################


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
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    return torch.device(name)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, dtype):
    """One mixed-precision context for every forward pass; fp32 is a no-op."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use bf16 on the CPU")
    return torch.autocast(device.type, dtype=DTYPES[dtype])


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
    ntasks = int(environ["SLURM_NTASKS"])
    procid = int(environ["SLURM_PROCID"])
    nnodes = int(environ.get("SLURM_JOB_NUM_NODES", environ.get("SLURM_NNODES", ntasks)))
    per_task = gpus_per_node if (ntasks == nnodes and gpus_per_node > 1) else 1
    master_addr = expand_nodelist(environ["SLURM_JOB_NODELIST"])[0]
    port = int(environ.get("MASTER_PORT") or 10000 + int(environ.get("SLURM_JOB_ID", 0)) % 20000)
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
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_NODELIST" in env:
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


def _run_rank(main, args, info, init_method):
    try:
        if info.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            # Local CPU processes share the cores (torchrun sets OMP_NUM_THREADS itself).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))
        if init_method is not None:
            backend = "nccl" if (torch.cuda.is_available() and args.device in ("auto", "cuda")) else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=info.rank,
                                    world_size=info.world_size)
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
            frames = traceback.extract_tb(e.__traceback__)
            if any("torch/distributed/" in f.filename.replace(os.sep, "/") for f in frames[-3:]):
                # A collective broke because a peer died: that peer printed the real error.
                report = f"[rank {info.rank}] stopped: a collective failed (another rank exited)\n"
            else:
                report = f"[rank {info.rank}] {''.join(traceback.format_exception(e))}"
            print(report, file=sys.stderr, end="", flush=True)
            os._exit(1)  # do not wait in collectives that will never complete
        raise


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
                        help=f"print the training loss every N batches (default {d['log_interval']})")
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


MODEL_FLAGS = ("emsize", "nhid", "nlayers", "nhead", "dropout")


def add_model_flags(parser, **defaults):
    """Architecture flags. Scripts that start from --bert-model default them to None (take
    the checkpoint's); a value given that contradicts the checkpoint is an error."""
    helps = {"emsize": "hidden size", "nhid": "feed-forward size", "nlayers": "encoder layers",
             "nhead": "attention heads", "dropout": "dropout probability"}
    for name in MODEL_FLAGS:
        default = defaults.get(name)
        shown = default if default is not None else "from --bert-model"
        parser.add_argument(f"--{name}", type=float if name == "dropout" else int, default=default,
                            help=f"{helps[name]} (default {shown})")


def apply_model_flags(config, args, source=None):
    """Raise if an architecture flag disagrees with `config` (read from checkpoint `source`).
    --dropout is not architecture: when given, it replaces the checkpoint's in `config`."""
    if source is None:
        if config.emsize % config.nhead:
            raise UserError(f"--emsize {config.emsize} is not divisible by --nhead {config.nhead}")
        return
    for name in MODEL_FLAGS:
        given = getattr(args, name, None)
        if name != "dropout" and given is not None and given != getattr(config, name):
            raise UserError(f"--{name} {given} does not fit {source}, whose model has "
                            f"{name} {getattr(config, name)}; leave the flag out to use the checkpoint's")
    if getattr(args, "dropout", None) is not None:
        config.dropout = args.dropout


def parse_args(parser, argv=None):
    """Parse flags; with --checkpoint, start from the flags saved in the state file and
    apply only those given on this command line."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.checkpoint == "None":
        return args
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        _fail(f"--checkpoint {args.checkpoint}: no such file")
    except Exception as e:
        _fail(f"--checkpoint {args.checkpoint}: not a state file of this project ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "state" or "args" not in ckpt:
        _fail(f"--checkpoint {args.checkpoint}: not a state file (those are written to --state-file)")
    merged = dict(ckpt["args"])
    given = explicit_flags(parser, argv)
    merged.update({k: v for k, v in vars(args).items() if k in given or k not in merged})
    return argparse.Namespace(**merged)


###############################################################################
# Logging
###############################################################################


def make_logger(info):
    def log(*parts):
        if info.is_main:
            print(*parts, flush=True)

    return log


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


def _atomic_write(path, write):
    """Write to a temporary file in the same folder, fsync, then rename over `path`:
    a crash at any point leaves either the old file or the new one, never half of one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def model_checkpoint(kind, model, config, vocab, **extra):
    """A weights_only-loadable dict: state dict, architecture config, vocab words."""
    return {"kind": kind, "model": unwrap(model).state_dict(), "config": config.to_dict(),
            "vocab": list(vocab.itos), **extra}


def load_checkpoint(path, flag):
    """torch.load(weights_only=True) with one-line errors naming the flag and the file."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds; its messages advise on unsafe loading
        raise UserError(f"{flag} {path}: not a checkpoint of this project (it does not load with "
                        f"torch.load(weights_only=True): {type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "vocab"} <= ckpt.keys():
        raise UserError(f"{flag} {path}: not a checkpoint of this project "
                        "(expected a dict with model, config and vocab)")
    return ckpt


def encoder_state(ckpt, flag, path):
    """The BertModel weights inside any checkpoint: an encoder, or a task model around one."""
    state = ckpt["model"]
    if ckpt.get("kind") == "encoder":
        return state
    prefix = "bert_model."
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise UserError(f"{flag} {path}: holds no BERT encoder weights")
    return encoder


def load_pretrained(path, flag="--bert-model"):
    """(config, vocab, encoder weights) from any checkpoint that holds a BERT encoder."""
    from data import Vocab  # data imports utils
    from model import BertConfig

    ckpt = load_checkpoint(path, flag)
    try:
        config = BertConfig.from_dict(ckpt["config"])
        vocab = Vocab(ckpt["vocab"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{flag} {path}: its config or vocab is unusable ({e})") from None
    if config.vocab_size != len(vocab):
        raise UserError(f"{flag} {path}: its vocab has {len(vocab)} words but its model "
                        f"{config.vocab_size}")
    return config, vocab, encoder_state(ckpt, flag, path)


def save_vocab_copy(vocab, path, log):
    """Write a checkpoint's vocab to --save-vocab unless that file already holds it."""
    import data  # data imports utils

    try:
        if data.load_vocab(path)[0].itos == vocab.itos:
            return
    except (FileNotFoundError, data.DataError):
        pass
    data.save_vocab(vocab, path)
    log(f"wrote the vocab of {len(vocab)} words to {path}")


def task_model_from_encoder(task_class, config, encoder, path, device):
    """A task model (NextSentenceTask, QuestionAnswerTask) around the pretrained encoder
    weights read from --bert-model `path`."""
    model = task_class(config)
    load_into(model.bert_model, encoder, "--bert-model", path)
    return model.to(device)


def load_into(module, state, flag, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{flag} {path}: weights do not fit the model ({detail})") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


###############################################################################
# Training loop shared by the three tasks
###############################################################################


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit) set a flag; the loop
    finishes its step, writes the state file and exits."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def any_rank(self, info):
        if not info.enabled:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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


class Trainer:
    """The epoch loop of all three tasks: log, checkpoint, resume, stop on signal or NaN.

    A task supplies `loss_fn(model, batch) -> scalar loss`, `batches(epoch, start)` (the
    rank's batches of an epoch from batch `start`), `num_batches(epoch)`, `evaluate(model)
    -> (val_loss, score, extra_text)` where a lower score is better, and `save_best(model)`.
    """

    def __init__(self, task, model, args, info, device, log):
        self.task, self.args, self.info, self.device, self.log = task, args, info, device, log
        self.state = TrainState()
        self.preemption = Preemption()
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
        self.epoch_loss = torch.zeros((), device=device)
        # The old example's schedule: plain SGD, lr x0.1 whenever validation does not improve.
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=0.1)
        if args.checkpoint != "None":
            self.load_state(load_checkpoint(args.checkpoint, "--checkpoint"), model)
            log(f"resumed from {args.checkpoint} at epoch {self.state.epoch}, "
                f"step {self.state.step_in_epoch} of the epoch ({self.state.global_step} in all)")
        self.model = wrap_ddp(model, device, info)
        if args.compile:
            self.model = torch.compile(self.model)

    # -- state file ---------------------------------------------------------
    def state_dict(self, extra):
        return {
            "kind": "state", "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "train_state": vars(self.state).copy(),
            "rng": rng_state(), "args": vars(self.args).copy(), **extra,
        }

    def save_state(self, extra):
        self.state.epoch_loss_sum = float(self.epoch_loss)
        if self.info.is_main:
            atomic_save(self.state_dict(extra), self.args.state_file)

    def load_state(self, ckpt, model):
        if ckpt.get("kind") != "state":
            raise UserError(f"--checkpoint {self.args.checkpoint}: not a state file")
        load_into(model, ckpt["model"], "--checkpoint", self.args.checkpoint)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        set_rng_state(ckpt["rng"])

    def load_best(self, path):
        """After fit: every rank loads the best model rank 0 saved at `path`; returns the
        plain module (no DDP, no compile wrapper) for the final evaluation."""
        barrier(self.info)
        model = unwrap(self.model)
        load_into(model, load_checkpoint(path, "best model")["model"], "best model", path)
        return model

    # -- loop ---------------------------------------------------------------
    def fit(self, state_extra):
        """Train until --epochs or --max-steps; returns True when stopped by a signal."""
        args, st = self.args, self.state
        while st.epoch <= args.epochs:
            epoch_start = time.time()
            stopped = self.train_epoch(state_extra)
            if stopped == "signal":
                return True
            val_loss, score, extra_text = self.task.evaluate(unwrap(self.model))
            st.val_loss_log.append(val_loss)
            self.log("-" * 89)
            self.log(f"| end of epoch {st.epoch:3d} | time: {time.time() - epoch_start:5.2f}s | "
                     f"valid loss {val_loss:8.5f} | {extra_text}")
            self.log("-" * 89)
            if st.best_score is None or score < st.best_score:
                st.best_score = score
                if self.info.is_main:
                    self.task.save_best(unwrap(self.model))
            else:
                self.scheduler.step()  # the old schedule: lr x0.1 when validation does not improve
            st.epoch += 1
            st.step_in_epoch = 0
            self.epoch_loss.zero_()
            self.save_state(state_extra)
            if stopped == "max_steps":
                break
        return False

    def train_epoch(self, state_extra):
        args, st, model = self.args, self.state, self.model
        model.train()
        n_batches = self.task.num_batches(st.epoch)
        total_loss = torch.zeros((), device=self.device)
        self.epoch_loss.fill_(st.epoch_loss_sum)
        first_bad_step = torch.full((), -1, device=self.device)
        logged = 0
        start = time.time()
        for batch in self.task.batches(st.epoch, st.step_in_epoch):
            batch = to_device(batch, self.device)
            with autocast(self.device, args.dtype):
                loss = self.task.loss_fn(model, batch)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            # No .item() here: a host sync every step stalls the GPU. Losses and the
            # first non-finite step are accumulated on the device and read at log time.
            loss = loss.detach().float()
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
            preempted = self.preemption.any_rank(self.info)
            if at_log or at_save or at_max or preempted or st.step_in_epoch == n_batches:
                self.check_finite(first_bad_step)
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
                self.save_state(state_extra)
                self.log(f"stopped by a signal at step {st.global_step}; the state is in "
                         f"{args.state_file}. Resume with: python {os.path.basename(sys.argv[0])} "
                         f"--checkpoint {args.state_file}")
                return "signal"
            if at_save:
                self.save_state(state_extra)
            if at_max:
                break
        if st.step_in_epoch:
            st.train_loss_log.append(self.epoch_loss.item() / st.step_in_epoch)
        self.epoch_loss.zero_()
        return "max_steps" if (args.max_steps and st.global_step >= args.max_steps) else None

    def check_finite(self, first_bad_step):
        if self.info.enabled:
            flag = first_bad_step.clone().float()
            flag[flag < 0] = math.inf
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            step = int(flag.item()) if math.isfinite(flag.item()) else -1
        else:
            step = int(first_bad_step.item())
        if step >= 0:
            state_file = self.args.state_file
            if os.path.exists(state_file):
                hint = f"the last good state file {state_file} is untouched (resume from it with a lower --lr)"
            else:
                hint = "no state file was written before it"
            raise NonFiniteLoss(f"the training loss became NaN or infinite at step {step}; stopped: {hint}")


def explicit_flags(parser, argv):
    """The flags given on the command line (not defaults): on resume they override the
    saved ones, everything else comes from the state file."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))

"""Device and precision: which device a rank trains on, in which precision, with how many
CPU threads. (Distributed launch: distributed.py; logs and progress: logs.py; files:
files.py.)"""

import contextlib
import math
import os
import random

import torch


class UserError(Exception):
    """Bad input (a flag, a file): reported as one line `error: ...`, exit code 2."""


class DataError(UserError):
    """A problem with the input data, reported as one line (no traceback)."""


###############################################################################
# Value rules: the range of each setting, written once, beside the settings object that
# owns it (TrainConfig, BertConfig, Masking, ...), which checks itself with check_rules().
# flags.py names a broken rule by its flag: `--lr -1.0: must be > 0`.
###############################################################################

class SettingError(ValueError):
    """A setting outside its range: `name value: requirement`."""

    def __init__(self, name, value, requirement):
        self.name, self.value, self.requirement = name, value, requirement
        # As typed on a command line: --betas 0.9 1.5, not (0.9, 1.5).
        self.shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        super().__init__(f"{name} {self.shown}: {requirement}")


def finite(x):
    return x is not None and not isinstance(x, bool) and math.isfinite(x)


def positive(x):
    return finite(x) and x > 0


def at_least(n):
    return lambda x: x >= n


def fraction(x):  # [0, 1)
    return finite(x) and 0 <= x < 1


def one_of(*choices):
    return lambda x: x in choices


def check_rules(obj, rules):
    """SettingError for the first field of `obj` that breaks its rule; None skips a field
    (not given: it comes from elsewhere, e.g. a checkpoint)."""
    for name, (ok, requirement) in rules.items():
        value = getattr(obj, name)
        if value is not None and not ok(value):
            raise SettingError(name, value, requirement)


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


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo; none known elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()[2:]}
    except OSError:
        return set()


def native_bf16(device):
    """("bf16" or "fp32", why): bf16 where the device computes in it natively: a CPU
    with AVX512-BF16 or AMX-BF16 (/proc/cpuinfo's flags), a GPU that is not emulating it."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{torch.cuda.get_device_name(device)} has native bf16"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type != "cpu":
        return "fp32", f"bf16 autocast is not chosen on {device.type}"
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if native:
        return "bf16", f"the CPU has {' and '.join(native)}"
    return "fp32", "the CPU has no native bf16 (no avx512_bf16 or amx_bf16 flag)"


def setup_device(name, dtype, info):
    """The rank's device of --device `name`, its precision `dtype` checked (see
    check_precision)."""
    device = get_device(name, info.local_rank)
    check_precision(device, dtype)
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


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread inside the block, its thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_device(batch, device):
    # non_blocking pairs with the DataLoader's pinned memory on CUDA.
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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

"""--size's presets (SIZES) and the device-dependent part of --recipe laptop (--dtype
auto); bertkit/flags.py applies them as it parses."""

import utils
from bertkit.files import UserError
from bertkit.training import budget

# The BERT miniatures' shapes (Turc et al. 2019): --size NAME is (layers, hidden), with
# hidden / 64 heads and a feed-forward of 4 x hidden; the model flags given win.
SIZES = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512),
         "base": (12, 768)}
# Recipe settings of a new model only: a run from --bert-model keeps its own.
FRESH_ONLY = ("size", "tokenizer", "vocab_size")


def shown_value(name, value):
    if name == "time_budget":
        return budget.shown(value)
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return value


def resolve_precision(args, device, log):
    """--dtype auto (--recipe laptop's) as the device's: bf16 where it computes in it
    natively (utils.native_bf16), else fp32, said in one line; --recipe laptop on a GPU:
    one line on what changes."""
    if args.dtype == "auto":
        args.dtype, why = utils.native_bf16(device)
        log(f"--dtype auto: {args.dtype} ({why})")
    if getattr(args, "recipe", None) == "laptop" and device.type != "cpu":
        log(f"--recipe laptop on {device.type}: its CPU settings as they are, {args.dtype} "
            "autocast" + (", compiled" if args.compile else "") + "; a GPU has room for a "
            "larger --size and --batch_size")


def add_size_flag(parser):
    parser.add_argument("--size", type=str, default=None, choices=list(SIZES),
                        help="a new model's shape: " + ", ".join(
                            f"{name} {layers}/{hidden}" for name, (layers, hidden) in
                            SIZES.items()) + " (layers/hidden; heads hidden/64, feed-forward "
                        "4 x hidden); --emsize, --nlayers, --nhead, --nhid given win "
                        "(default: the model flags' defaults)")


def apply_size(args, given):
    """--size as the model flags not given; refused where the architecture comes from
    --bert-model (unless --from-scratch)."""
    size = getattr(args, "size", None)
    if size is None:
        return
    if getattr(args, "bert_model", None) and not getattr(args, "from_scratch", False):
        if "size" in given:
            raise UserError(f"--size {size}: --bert-model {args.bert_model} brings its "
                            "architecture; leave --size out")
        return
    layers, hidden = SIZES[size]
    for name, value in (("nlayers", layers), ("emsize", hidden), ("nhead", hidden // 64),
                        ("nhid", 4 * hidden)):
        if getattr(args, name, None) is None:
            setattr(args, name, value)

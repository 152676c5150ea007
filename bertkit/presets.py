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


def shown_flag(name, value):
    """'--lr 0.001', '--next-sentence' (a switch on), '--no-next-sentence' (off)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {shown_value(name, value)}"


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


def add_fresh_model_flags(parser):
    """--from-scratch and --size, for the scripts that fine-tune --bert-model."""
    parser.add_argument("--from-scratch", action="store_true",
                        help="fresh weights: --bert-model's architecture and vocabulary with no "
                             "pretraining (the random-init control of what pretraining bought); "
                             "--size and the model flags may change the architecture (default off)")
    add_size_flag(parser)


def from_scratch(config, args, log):
    """--from-scratch: --bert-model's BertConfig `config` with the model flags given (and
    --size's) instead of its own, its positions untrained, said in one line; else `config`."""
    if not getattr(args, "from_scratch", False):
        return config
    values = config.to_dict()
    values.update({name: getattr(args, name) for name in ("emsize", "nhid", "nlayers", "nhead")
                   if getattr(args, name, None) is not None})
    values["trained_len"] = None
    try:
        config = type(config).from_dict(values)
    except ValueError as e:
        raise UserError(f"the model flags do not make a BERT: {e}") from None
    log(f"--from-scratch: the architecture ({config.nlayers} layers, hidden {config.emsize}) "
        f"and vocabulary of {args.bert_model}, fresh weights (--seed {args.seed}): no pretraining")
    return config


def start_text(args):
    """Where a fine-tuning run's weights come from, for its first line."""
    if getattr(args, "from_scratch", False):
        return f"from scratch ({args.bert_model}'s architecture and vocabulary)"
    return f"from {args.bert_model}"


def add_size_flag(parser):
    parser.add_argument("--size", type=str, default=None, choices=list(SIZES),
                        help="a new model's shape: " + ", ".join(
                            f"{name} {layers}/{hidden}" for name, (layers, hidden) in
                            SIZES.items()) + " (layers/hidden; heads hidden/64, feed-forward "
                        "4 x hidden); --emsize, --nlayers, --nhead, --nhid given win "
                        "(default: the model flags' defaults)")


def apply_size(args, given, resumed=False):
    """--size as the model flags not given; refused where the architecture comes from
    --bert-model (unless --from-scratch). --from-scratch without --bert-model given: an
    error (its default is no model to copy the shape of)."""
    if getattr(args, "from_scratch", False) and not resumed and "bert_model" not in given:
        raise UserError("--from-scratch needs --bert-model: the model whose architecture and "
                        "vocabulary it builds with fresh weights (no pretraining)")
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

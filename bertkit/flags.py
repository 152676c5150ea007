"""Flags: the parser of each script and how its flags become the settings objects
(TrainConfig, BertConfig, Masking, Windowing, ...), each of which checks its own ranges
(utils.py); on --checkpoint, the flags saved in the state file, with those given again
on the command line winning; --checkpoint auto resolved to the state file it resumes.

Every problem is one line `error: ...`, exit code 2. (Paths and locks: bertkit/checks.py.)
"""

import argparse
import copy
import os
import re
import sys
import time
import uuid

import data
import utils
from bertkit import checkpoint, presets, recipes
from bertkit.files import UserError, in_folder, load_torch
from bertkit.squad import windows
from bertkit.text import corpus, tokenizer
from bertkit.training import budget, distributed, states, trainer
from model import BertConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: --flag value: why`, exit 2) and both
    spellings of every flag: the old example's underscores (--batch_size) and dashes
    (--batch-size) name the same flag."""

    def error(self, message):
        # argparse says "argument --lr: invalid float value: 'x'"; keep only the substance.
        message = re.sub(r"^argument (--?[\w-]+)(/--?[\w-]+)*: ", r"\1: ", message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)

    def _add_action(self, action):
        for option in list(action.option_strings):
            if option.startswith("--"):
                other = "--" + option[2:].translate(str.maketrans("_-", "-_"))
                if other != option and other not in self._option_string_actions:
                    action.option_strings.append(other)
        return super()._add_action(action)


def add_common_flags(parser, **defaults):
    """Flags shared by the task scripts; each script passes its own defaults."""
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
    parser.add_argument("--log-interval", type=int, default=None, metavar="N",
                        help="print the training loss (and write a metrics row) every N "
                             "optimizer steps (batches when --grad-accum is 1) (default "
                             f"{d['log_interval']}, or less on a short run: every "
                             f"1/{trainer.LOG_POINTS} of its steps)")
    parser.set_defaults(default_log_interval=d["log_interval"])
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
    parser.add_argument("--dtype", type=str, default="fp32", choices=[*utils.DTYPES, "auto"],
                        help="autocast precision: fp32, bf16 (CPU or recent GPUs), fp16 (GPU, with a "
                             "gradient scaler), auto (bf16 where the device has it natively, else "
                             "fp32; said in one line) (default fp32)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (--no-compile: eager) (default: on for "
                             "CUDA, where it fuses the elementwise work between the matmuls; "
                             "off elsewhere)")
    parser.add_argument("--max-steps", type=int, default=0, metavar="N",
                        help="stop after N optimizer steps, then validate and test (default 0: no limit)")
    parser.add_argument("--time-budget", type=budget.duration, default=None, metavar="TIME",
                        help="train for as many optimizer steps as fit in TIME (90s, 60m, 2h, "
                             "1.5h), evaluation and saving included: measured on the first steps, "
                             "fixed then (the warmup and decay span them) and kept in the state "
                             "file; --max-steps and --epochs still cap them (default: none)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="DataLoader worker processes building batches (default 0: in the main process)")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="also write the state file every N steps (default 0: at epoch ends only)")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="also validate every N optimizer steps, mid-epoch; the best model, "
                             "the plateau schedule and the metrics log follow each validation "
                             "(default 0: at epoch ends only)")
    parser.add_argument("--eval-batches", type=int, default=0, metavar="N",
                        help="at most N batches per evaluation, a fixed sample spread evenly over "
                             "the split, the final test included (qa_task.py: its validations; "
                             "the predictions file always answers every question) (default 0: "
                             "every batch)")
    add_optimizer_flags(parser, **{k: d[k] for k in OPTIMIZER_DEFAULTS if k in d})
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (default: shown when stderr is a terminal)")
    add_run_file_flags(parser, d)


def add_run_file_flags(parser, d):
    """The files of a run: where it writes them (--output-dir and each output), its state
    files and how it resumes from them; `d`: the script's defaults."""
    parser.add_argument("--checkpoint", type=str, default="None",
                        help="resume from this state file (see --state-file); the flags saved in it "
                             "apply unless given again. auto: resume from --state-file when there "
                             "is one (the newest of --keep-states that loads), else start a new "
                             "run; a run that finished exits at once (default None)")
    parser.add_argument("--save", type=str, default=d["save"], help=f"where to write the model (default {d['save']})")
    parser.add_argument("--save-vocab", type=str, default="bert_vocab.pt",
                        help="vocab file. mlm_task: reused if built from the same dataset and "
                             "--min-freq, else built there; ns/qa_task: a copy of the checkpoint's "
                             "vocab is written there (default bert_vocab.pt)")
    parser.add_argument("--state-file", type=str, default=d["state_file"],
                        help=f"full training state for --checkpoint, written atomically (default {d['state_file']})")
    parser.add_argument("--keep-states", type=int, default=2, metavar="K",
                        help="state files kept: the newest at --state-file, the K-1 before it "
                             "beside it (STATE.1, ...), for --checkpoint auto to fall back to "
                             "when the newest does not load (default 2)")
    parser.add_argument("--slurm-requeue", action="store_true",
                        help="when SLURM stops the job (SIGUSR1, SIGTERM), requeue it once the "
                             "state file is written (scontrol requeue); it resumes with "
                             "--checkpoint auto. An error outside SLURM (default off)")
    # <task>_state.pt -> <task>_metrics.jsonl: each script names its files once.
    metrics_file = d["state_file"].replace("_state.pt", "_metrics.jsonl")
    parser.add_argument("--metrics-file", type=str, default=metrics_file,
                        help="JSON lines, one per --log-interval (step, epoch, loss, lr, tokens_per_s) "
                             f"and one per evaluation (its metrics) (default {metrics_file})")
    parser.add_argument("--tensorboard", type=str, nargs="?", default=None,
                        const=TENSORBOARD_IN_OUTPUT_DIR, metavar="DIR",
                        help="also write the metrics as TensorBoard events in DIR, or without "
                             "DIR in <output-dir>/tensorboard (needs the tensorboard package) "
                             "(default: none)")
    parser.add_argument("--output-dir", type=str, default=".", metavar="DIR",
                        help="the folder of every file the run writes: models, state, logs, "
                             "vocab copy, predictions; made when absent. An output flag given "
                             "a file name alone (--save my.pt) writes it there too; a path "
                             "with a folder (--save ./my.pt, --save models/my.pt) is kept as "
                             "typed, relative to the current folder; a resumed run keeps the "
                             "folder of its state file (default .: the current folder)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model file that another run (of other settings) "
                             "wrote at one of this run's outputs (default off: refuse)")


###############################################################################
# --output-dir
###############################################################################

# The flags that name a file a run writes: left at its default, or given a file name
# alone, the name goes into --output-dir (place_outputs). A new script's output flag of one
# of these names follows.
OUTPUT_FLAGS = ("save", "save_vocab", "state_file", "metrics_file", "predictions",
                "test_predictions", "na_probs", "tensorboard")
# --tensorboard given without DIR.
TENSORBOARD_IN_OUTPUT_DIR = "<output-dir>/tensorboard"


def in_output_dir(args, name):
    """The path of a file `name` a run writes: in --output-dir (files.in_folder)."""
    return in_folder(getattr(args, "output_dir", "."), name)


def place_outputs(parser, args, given):
    """Every output flag (OUTPUT_FLAGS) left at its default, or given a file name alone
    (--save my.pt), in --output-dir; one given a path with a folder (--save ./my.pt) stays
    as typed, relative to the current folder (with --output-dir left out, every name is
    where the old example wrote it); --tensorboard without DIR: <output-dir>/tensorboard.
    Runs first in parse_args, so whatever reads a path (a resume from --state-file) reads
    the final one. args.explicit_outputs: the output flags given."""
    folder = getattr(args, "output_dir", None)
    if folder is None:
        return
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--output-dir {folder}: is a file, not a folder")
    if getattr(args, "tensorboard", None) == TENSORBOARD_IN_OUTPUT_DIR:
        args.tensorboard = "tensorboard"

    def placed(path, name):
        if not isinstance(path, str) or (name in given and os.path.dirname(path)):
            return path
        return in_output_dir(args, path)

    dests = {action.dest for action in parser._actions}
    for name in OUTPUT_FLAGS:
        value = getattr(args, name, None)
        if name in dests and value is not None:
            setattr(args, name, [placed(v, name) for v in value] if isinstance(value, list)
                    else placed(value, name))
    args.explicit_outputs = sorted(set(OUTPUT_FLAGS) & given)


def check_resumed_output_dir(args, given, saved, path):
    """A resumed run writes where it started (its best model so far is there): an
    --output-dir given again must be the saved one (before it existed: the current folder)."""
    saved_folder = saved.get("output_dir") or "."
    if "output_dir" in given and (os.path.realpath(args.output_dir)
                                  != os.path.realpath(saved_folder)):
        raise UserError(f"--output-dir {args.output_dir}: --checkpoint {path} is a run of "
                        f"--output-dir {saved_folder}, where it resumes; leave --output-dir "
                        "out, or give that folder")


def add_evaluate_only_flag(parser):
    parser.add_argument("--evaluate-only", action="store_true",
                        help="no training: evaluate --bert-model (a model with this task's "
                             "head) on the valid and test splits (--eval-batches applies) and "
                             "write the metrics log, nothing else (default off)")


# The optimizer flags' defaults: the old example's (plain SGD, lr x0.1 when validation does
# not improve), so its commands mean what they meant; a script without an old example
# (glue_task.py) passes its own to add_common_flags.
OPTIMIZER_DEFAULTS = {"optimizer": "sgd", "weight_decay": 0.0, "schedule": "plateau",
                      "warmup": 0.0}


def add_optimizer_flags(parser, **defaults):
    """The optimizer and the schedule (defaults: OPTIMIZER_DEFAULTS, or the script's)."""
    d = {**OPTIMIZER_DEFAULTS, **defaults}
    parser.add_argument("--optimizer", type=str, default=d["optimizer"], choices=trainer.OPTIMIZERS,
                        help="sgd: plain SGD (the old example's); adamw: AdamW, fused kernels where "
                             f"PyTorch has them for the device (default {d['optimizer']})")
    parser.add_argument("--weight-decay", type=float, default=d["weight_decay"],
                        help="weight decay per unit of lr, never on biases and LayerNorm weights "
                             f"(adamw: decoupled; sgd: L2, added to the gradient) (default "
                             f"{d['weight_decay']:g})")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"),
                        help="adamw: decay rates of the gradient's moving averages (default "
                             "0.9 0.999, PyTorch's; RoBERTa uses 0.9 0.98)")
    parser.add_argument("--eps", type=float, default=1e-8,
                        help="adamw: added to the denominator (default 1e-8; RoBERTa 1e-6)")
    parser.add_argument("--schedule", type=str, default=d["schedule"], choices=trainer.SCHEDULES,
                        help="plateau: lr x0.1 after an epoch whose validation does not improve (the "
                             "old example's); linear, cosine: per optimizer step, from --lr down to 0 "
                             f"at the last step of the run (default {d['schedule']})")
    parser.add_argument("--warmup", type=float, default=d["warmup"], metavar="F",
                        help="linear and cosine: the fraction of all optimizer steps over which the "
                             f"lr rises linearly from 0 to --lr (default {d['warmup']:g})")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N",
                        help="batches per optimizer step, their gradients summed: the effective "
                             "batch is batch_size x N x processes; --max-steps, --log-interval and "
                             "--save-every count optimizer steps (default 1)")


def add_dataset_flag(parser, default):
    parser.add_argument("--dataset", type=corpus.dataset_name, default=default,
                        help="WikiText2, WikiText103, EnWik9, BookCorpus (in any case), or a "
                             f"folder of text files (default {default})")


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


# Ranges of the flags that no settings object owns (the others: SETTINGS below).
FLAG_RULES = {
    "world_size": (utils.at_least(1), "must be at least 1"),
    "bptt": (utils.at_least(4), "must be at least 4"),
    "null_threshold": (utils.finite, "must be a finite number"),
    "recipe": (utils.one_of(*recipes.RECIPES), f"use one of {', '.join(recipes.RECIPES)}"),
}
# The settings objects flags become, each with the RULES of its fields.
SETTINGS = (trainer.TrainConfig, data.Masking, data.Pairs, tokenizer.TokenizerSpec,
            windows.Windowing)
# Model flags override a checkpoint's BertConfig: each is checked by BertConfig's own rule.
MODEL_RULES = {name: BertConfig.RULES[name] for name in MODEL_FLAGS}


def check_values(args, parser):
    """Every flag value against its rule: FLAG_RULES, the model flags' and those of the
    SETTINGS classes. The first that breaks is the error; a flag the script does not have
    is skipped, as is None (not given: it comes from a checkpoint)."""
    tables = [FLAG_RULES, MODEL_RULES, *(owner.RULES for owner in SETTINGS)]
    probe = argparse.Namespace(**{name: getattr(args, name, None)
                                  for table in tables for name in table})
    for table in tables:
        try:
            utils.check_rules(probe, table)
        except utils.SettingError as e:
            raise flag_error(parser, e) from None


def flag_error(parser, error):
    """A SettingError as the user typed it: `--lr -1.0: must be > 0` (without a parser,
    the dashed spelling, which every script accepts too)."""
    if parser is not None and any(a.dest == error.name for a in parser._actions):
        name = flag_name(parser, error.name)
    else:
        name = "--" + error.name.replace("_", "-")
    return UserError(f"{name} {error.shown}: {error.requirement}")


def flag_name(parser, dest):
    return next(a.option_strings[0] for a in parser._actions if a.dest == dest)


def settings(cls, args, parser=None, **given):
    """A settings object from the flags of the same names (plus `given`), its rules'
    errors named by flag."""
    values = {name: getattr(args, name) for name in cls.__dataclass_fields__
              if hasattr(args, name)}
    try:
        return cls(**{**values, **given})
    except utils.SettingError as e:
        raise flag_error(parser, e) from None


def train_config(args):
    """The run's TrainConfig, made once in a script's main (after mains.start has resolved
    --compile); "None" is the old example's spelling of no --checkpoint."""
    return settings(trainer.TrainConfig, args,
                    checkpoint=None if args.checkpoint == "None" else args.checkpoint)


def model_config(config, args, source, log):
    """`config` (of checkpoint `source`) after the model flags: an architecture flag must
    agree with it; --dropout, when given, replaces its dropout. --bptt must fit its
    positions (check_bptt)."""
    for name in MODEL_FLAGS:
        given = getattr(args, name, None)
        if name != "dropout" and given is not None and given != getattr(config, name):
            raise UserError(f"--{name} {given} does not fit {source}, whose model has "
                            f"{name} {getattr(config, name)}; leave the flag out to use the checkpoint's")
    if getattr(args, "dropout", None) is not None:
        config.dropout = args.dropout
    check_bptt(args.bptt, config, source, log)
    return config


def fine_tuning_start(args, info, log, kind):
    """(the weights a task model of `kind` starts from (checkpoint.starting_weights; None:
    --from-scratch's fresh ones), BertConfig after the model flags, tokenizer) of
    --bert-model, for ns_task.py, qa_task.py and glue_task.py; the effective settings
    printed when --recipe is given."""
    ckpt = checkpoint.load_checkpoint(args.bert_model, "--bert-model")
    weights = None if getattr(args, "from_scratch", False) else checkpoint.starting_weights(
        ckpt, kind, args.bert_model, getattr(args, "evaluate_only", False))
    config, vocab = checkpoint.config_and_vocab(ckpt, "--bert-model", args.bert_model)
    config = model_config(presets.from_scratch(config, args, log), args, args.bert_model, log)
    if args.recipe:
        log(recipes.recipe_summary(args, info.world_size, config.dropout))
    return weights, config, vocab


def check_bptt(bptt, config, source, log):
    """--bptt within the positions of `source`'s model, and a warning line when it is
    longer than the sequences the model was trained on (BertConfig.trained_len): the
    position embeddings past those were never learned."""
    if bptt > config.max_len:
        raise UserError(f"--bptt {bptt} is longer than the {config.max_len} positions of {source}")
    if config.trained_len is not None and bptt > config.trained_len:
        log(f"warning: --bptt {bptt} is longer than the sequences of at most "
            f"{config.trained_len} tokens {source} was trained on: its position embeddings "
            f"past {config.trained_len} were never learned (pretrain at --bptt {bptt}, or "
            f"give --bptt {config.trained_len})")


def parse_args(parser, argv=None):
    """Parse flags and check their values; with --checkpoint, start from the flags saved in
    the state file and apply only those given on this command line."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    try:
        given = explicit_flags(parser, argv)
        place_outputs(parser, args, given)  # first: --checkpoint auto reads --state-file
        args.script = parser.prog
        auto = args.checkpoint == "auto"
        resumed = resolve_checkpoint(parser, args, given)
        if resumed:
            args = _merge_saved_flags(parser, argv, args, auto)
        if not getattr(args, "run_id", None):  # a resumed run keeps its state's
            args.run_id = uuid.uuid4().hex
        if getattr(args, "recipe", None) is not None:
            recipes.apply_recipe(args, given, resumed)
        presets.apply_size(args, given, resumed)
        # --time-budget's clock: this process's start, or now for a run parsed in-process.
        args.launched_at = budget.process_started() if from_command_line else time.time()
        check_values(args, parser)
        settings(trainer.TrainConfig, args, parser)  # the rules between flags, too
        if getattr(args, "slurm_requeue", False):
            distributed.check_slurm_requeue()
    except UserError as e:
        parser.error(str(e))
    return args


def resolve_checkpoint(parser, args, given):
    """--checkpoint auto, resolved once, through the run's --state-file as it is final
    here: the newest state file there that loads (states.resumable; a line says when it
    is an older one), or "None" for a new run, said in one line. A state of another run
    is an error (check_resumable); then a run that finished ends the process here: exit
    0, nothing touched. Returns whether the run resumes; the flags saved in that state
    file and the Trainer then read the same file. --evaluate-only and --predict resume
    nothing: they evaluate, or predict."""
    if args.checkpoint != "auto" or getattr(args, "evaluate_only", False) or getattr(
            args, "predict", False):
        args.checkpoint = "None" if args.checkpoint == "auto" else args.checkpoint
        return args.checkpoint != "None"
    path, state, notes = states.resumable(args.state_file)
    if state is not None:
        check_resumable(parser, state, args, given, path, auto=True)
    if state is not None and state.get("finished") is True:
        notes.append(f"--checkpoint auto: {path}: this run finished (step "
                     f"{states.step_of(state)}, every output written); nothing to do. To "
                     f"train again, give another --state-file or remove {path}")
    if distributed.launcher_rank() == 0:
        for note in notes:
            print(note, flush=True)
    if state is not None and state.get("finished") is True:
        sys.exit(0)
    args.checkpoint = path or "None"
    return path is not None


# Flags about this start of a run, not the run: never taken from a state file.
LAUNCH_FLAGS = {"slurm_requeue", "launched_at", "overwrite"}


def _merge_saved_flags(parser, argv, args, auto=False):
    """The flags saved in the state file args.checkpoint, those given on the command line
    winning. `auto`: the command that started the run, given again: its --recipe is the
    saved one, and the run goes on at its --state-file, where auto found the state."""
    path, given = args.checkpoint, explicit_flags(parser, argv)
    if "recipe" in given and not auto:
        raise UserError(f"--recipe {args.recipe}: a resumed run keeps the settings "
                        "saved in its state file; leave --recipe out")
    try:
        ckpt = load_torch(path, mmap=True)
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file") from None
    except Exception as e:  # torch raises many kinds; its messages advise on unsafe loading
        raise UserError(f"--checkpoint {path}: not a state file of this project "
                        f"({type(e).__name__})") from None
    check_resumable(parser, ckpt, args, given, path, auto)
    if "recipe" in given and ckpt["args"].get("recipe") != args.recipe:
        raise UserError(f"--recipe {args.recipe}: the run at {path} was started with --recipe "
                        f"{ckpt['args'].get('recipe')}; a resumed run keeps it")
    check_resumed_output_dir(args, given, ckpt["args"], path)
    merged = dict(ckpt["args"])
    given |= LAUNCH_FLAGS | ({"state_file"} if auto else set())
    merged.update({k: v for k, v in vars(args).items() if k in given or k not in merged})
    return argparse.Namespace(**merged)


def check_resumable(parser, ckpt, args, given, path, auto=False):
    """A state file this command may resume (with --checkpoint PATH, or found by --checkpoint
    auto at `path`): a state of this project, its flags of their types, and of this
    command's run (states.check_same_run). Else a one-line error, before "finished" or
    "resume"."""
    where = f"--checkpoint auto: {path}" if auto else f"--checkpoint {path}"
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "state" or "args" not in ckpt:
        raise UserError(f"{where}: not a state file (those are written to --state-file)")
    check_saved_flags(parser, ckpt["args"], path)
    states.check_same_run(ckpt, parser.prog, {a.dest for a in parser._actions}, vars(args),
                          given, path, auto)


def check_saved_flags(parser, saved, path):
    """The flags of a state file are data from disk: a dict of flag names to values of
    each flag's type, or a one-line error naming the file."""
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise UserError(f"--checkpoint {path}: its saved flags are a {type(saved).__name__}, "
                        "not a dict of flag names (not a state file of this project)")
    if not isinstance(saved.get("script") or "", str):
        raise UserError(f"--checkpoint {path}: its saved script name is not a string")
    for action in parser._actions:
        value = saved.get(action.dest)
        if value is None or not action.option_strings or action.dest == "help":
            continue
        if not isinstance(value, _saved_type(action)):
            raise UserError(f"--checkpoint {path}: its saved {action.option_strings[0]} "
                            f"{value!r} is not a value of that flag")


def _saved_type(action):
    """The Python types a flag's saved value may have."""
    if hasattr(action, "saved_type"):  # its own (glue_task.py's --task: one task, a string)
        return action.saved_type
    if isinstance(action.default, bool):  # store_true flags
        return bool
    if action.nargs not in (None, 0, "?"):
        return list | tuple
    if action.type is float:
        return int | float
    if action.type in (int, str):
        return action.type
    return object


def explicit_flags(parser, argv):
    """The flags given on the command line (not defaults): on resume they override the
    saved ones, everything else comes from the state file."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


"""--recipe: published or measured settings, one flag away (RECIPES); the flags given on the
command line win. A recipe's global batch is split over the processes once their number is
known (split_global_batch); its effective settings make a run's first line (recipe_summary)."""

from bertkit import presets
from bertkit.files import UserError

# Published fine-tuning settings, one flag away; flags given on the command line win.
# "bert": BERT's fine-tuning (Devlin et al. 2019, section 4 and appendix A.3; Google's
# run_squad.py and transformers' run_qa.py examples): AdamW, 10% linear warmup then linear
# decay to 0, weight decay 0.01 (not on biases and LayerNorm weights), gradient norm 1.0,
# a global batch of 32 sequences, the checkpoint's dropout (--dropout is left alone).
# SQuAD: 2 epochs at 3e-5 on windows of 384 tokens, a new window every 128 context tokens,
# padding in the span loss as BERT has it; sentence pairs (GLUE): 3 epochs of 128 tokens.
# GLUE (glue_task.py): lr 2e-5, dropout 0.1 (the paper's appendix A.3 and transformers'
# run_glue.py README: 3 epochs, batch 32, max_seq_length 128, lr 2e-5 from the paper's
# {5e-5, 3e-5, 2e-5}; BertConfig's hidden and attention dropout 0.1).
RECIPES = {
    "bert": {
        "all": dict(optimizer="adamw", lr=3e-5, weight_decay=0.01, schedule="linear",
                    warmup=0.1, clip=1.0, global_batch=32),
        "qa_task.py": dict(epochs=2, bptt=384, doc_stride=128, span_loss="bert"),
        "ns_task.py": dict(epochs=3, bptt=128),
        "glue_task.py": dict(lr=2e-5, epochs=3, bptt=128, dropout=0.1),
    },
    # "laptop" (docs/recipes.rst): a small model's pretraining in an hour on a 2-core CPU,
    # and its fine-tuning; dtype "auto": bf16 where the CPU has it natively (presets.py).
    "laptop": {
        "all": dict(optimizer="adamw", lr=1e-4, weight_decay=0.01, schedule="linear",
                    warmup=0.1, clip=1.0, global_batch=32, dtype="auto"),
        "mlm_task.py": dict(size="mini", tokenizer="wordpiece", vocab_size=8192,
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6, warmup=0.06, clip=0.5,
                            mask_frac=0.25, mask_mode="bert", global_batch=32, bptt=128,
                            dropout=0.0, eval_batches=40, epochs=1000, time_budget=3600.0,
                            next_sentence=True),
        "qa_task.py": dict(epochs=3, bptt=384, doc_stride=128, span_loss="bert"),
        "ns_task.py": dict(epochs=3, bptt=128),
        "glue_task.py": dict(epochs=5, bptt=128, dropout=0.1),
    },
}
BATCH_FLAGS = ("batch_size", "grad_accum")


def add_recipe_flag(parser):
    names = ", ".join(RECIPES)
    parser.add_argument("--recipe", type=str, default=None, choices=list(RECIPES),
                        help=f"{names}: bert: the published fine-tuning settings (README, "
                             "\"Fine-tuning a published BERT\"); laptop: a small model's "
                             "pretraining in an hour on a CPU, and its fine-tuning "
                             "(docs/recipes.rst); the flags given on the command line win "
                             "(default none: the old example's settings)")


def recipe_settings(recipe, script):
    """{flag dest: value} of a recipe for a script (global_batch: sequences per optimizer
    step over all processes)."""
    table = RECIPES[recipe]
    return {**table["all"], **table.get(script, {})}


def apply_recipe(args, given, resumed=False):
    """The recipe's values for every flag of the script not `given` on the command line.
    args.global_batch is its global batch, split in split_global_batch once the number of
    processes is known; None when --batch_size and --grad-accum are both given. A resumed
    run has the values already (its saved flags): only the split of its global batch
    follows the batch flags given again."""
    if not resumed:
        settings = recipe_settings(args.recipe, args.script)
        fresh = getattr(args, "bert_model", None) is None or getattr(args, "from_scratch", False)
        for name, value in settings.items():
            if (name != "global_batch" and hasattr(args, name) and name not in given
                    and (fresh or name not in presets.FRESH_ONLY)):
                setattr(args, name, value)
        args.global_batch = settings["global_batch"]
        args.given_flags, args.given_batch_flags = sorted(given), []
    args.given_batch_flags = sorted(set(BATCH_FLAGS) & (given | set(args.given_batch_flags)))
    if set(BATCH_FLAGS) <= set(args.given_batch_flags):
        args.global_batch = None


def split_global_batch(args, world_size):
    """--recipe's global batch as --batch_size x --grad-accum x processes: the batch per
    process when --batch_size is not given (--grad-accum 1 unless given), else the
    --grad-accum that completes it; a one-line error when it does not divide."""
    total = getattr(args, "global_batch", None)
    if not total:
        return
    given = set(getattr(args, "given_batch_flags", ()))
    fixed = args.batch_size if "batch_size" in given else args.grad_accum
    if total % (fixed * world_size):
        shown = (f"--batch_size {args.batch_size}" if "batch_size" in given
                 else f"--grad-accum {args.grad_accum}")
        raise UserError(f"--recipe {args.recipe}: its global batch of {total} sequences is not "
                        f"{shown} x a whole number x {world_size} process(es); give --batch_size "
                        "and --grad-accum that fit")
    if "batch_size" in given:
        args.grad_accum = total // (fixed * world_size)
    else:
        args.batch_size = total // (fixed * world_size)


def recipe_summary(args, world_size, dropout):
    """The effective settings of a --recipe run, for its first log line; `dropout` is the
    model's (--dropout, else --bert-model's)."""
    settings = recipe_settings(args.recipe, args.script)
    shown = [presets.shown_flag(name, getattr(args, name))
             for name in settings if name != "global_batch" and hasattr(args, name)
             and getattr(args, name) is not None]
    given = sorted(set(getattr(args, "given_flags", ())) & {*settings, *BATCH_FLAGS, "dropout"})
    batch = args.batch_size * args.grad_accum * world_size
    if "dropout" in getattr(args, "given_flags", ()):
        source = "--dropout"
    elif "dropout" in settings:
        source = "--recipe"
    else:
        source = "--bert-model's"
    given = ", ".join("--" + g.replace("_", "-") for g in given) or "none"
    return (f"--recipe {args.recipe}: {' '.join(shown)} --batch_size {args.batch_size} "
            f"--grad-accum {args.grad_accum} (a global batch of {batch} sequences over "
            f"{world_size} process(es)), dropout {dropout} ({source}); given on the command "
            f"line: {given}")

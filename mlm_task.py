"""Masked-language-model pretraining of a BERT encoder.

    python mlm_task.py            # WikiText-2, BERT-base size -> mlm_bert.pt
"""

import argparse
import functools

import bertkit.cpu_threads  # noqa: F401 (OpenMP's wait policy, before torch loads)

import torch
import torch.nn.functional as F

import data
from bertkit import checkpoint, checks, flags, mains, presets, recipes
from bertkit.files import UserError
from bertkit.text import corpus
from bertkit.text.tokenizer import TokenizerSpec
from bertkit.training import distributed, logs, trainer
from model import BertConfig, MLMTask, PreTrainingTask

# The architecture of a model pretrained from scratch (BERT-base), flags left out.
FRESH_MODEL = dict(emsize=768, nhid=3072, nlayers=12, nhead=12, dropout=0.2)


def get_parser():
    parser = flags.ArgumentParser(prog="mlm_task.py",
                                   description="BERT masked-language-model pretraining")
    parser.add_argument("--bert-model", type=str, default=None,
                        help="continue pretraining this checkpoint (any of this project's holding "
                             "an encoder, or a transformers BERT folder); architecture and "
                             "tokenizer come from it (default None: a new model)")
    parser.add_argument("--tokenizer", type=str, default=None,
                        help="basic_english (the old example's words), wordpiece (BERT's, "
                             "learned from the train split), or PATH: a BERT vocab.txt, a "
                             "tokenizer.json or a transformers model folder (default "
                             "basic_english; with --bert-model, its tokenizer)")
    parser.add_argument("--vocab-size", type=int, default=30522,
                        help="tokens of a --tokenizer wordpiece vocabulary (default 30522)")
    flags.add_model_flags(parser, **FRESH_MODEL)
    presets.add_size_flag(parser)
    parser.add_argument("--mask_frac", type=float, default=0.15,
                        help="fraction of the tokens of each sequence that are masked (default 0.15)")
    parser.add_argument("--mask-mode", type=str, default="mask", choices=["mask", "bert"],
                        help="mask: every masked token becomes <MASK> (the old example); bert: "
                             "80%% <MASK>, 10%% random word, 10%% unchanged (default mask)")
    parser.add_argument("--next-sentence", action=argparse.BooleanOptionalAction, default=False,
                        help="also train BERT's next-sentence head: each sequence becomes "
                             "<cls> A <sep> B <sep>, B the rest of A's text or, for half, "
                             "text from elsewhere; the pooler it trains goes into the saved "
                             "models, for fine-tuning (default off: MLM alone)")
    flags.add_dataset_flag(parser, default="WikiText2")
    flags.add_evaluate_only_flag(parser)
    parser.add_argument("--min-freq", type=int, default=1,
                        help="words seen fewer times in the train split become <unk> (default 1)")
    flags.add_common_flags(parser, lr=6.0, clip=0.1, epochs=8, batch_size=32, bptt=128,
                           seed=5431916812, log_interval=10, save="mlm_bert.pt",
                           state_file="mlm_state.pt")
    recipes.add_recipe_flag(parser)
    return parser


# Validation and test perplexity are measured on the same masks whatever --mask_frac and
# --mask-mode train with (15% of positions, all <MASK>: the old example's masking), so runs
# with different training masks compare.
EVAL_MASKING = (0.15, "mask")


class MLM:
    """What the shared Trainer needs to know about masked-LM pretraining."""

    best_metric = ("loss", "min")

    def __init__(self, args, vocab, splits, config, info, device):
        self.args, self.vocab, self.config, self.info, self.device = args, vocab, config, info, device
        self.outputs, self.run = outputs(args), checks.run_record(vars(args))
        self.best_model_path = self.outputs["the best model"][0]
        self.masking = flags.settings(data.Masking, args, mask_id=vocab.mask_id,
                                      word_ids=vocab.word_ids)
        self.windows = {s: data.mlm_windows(splits[s], args.bptt) for s in data.SPLITS}
        self.ns_sums = logs.PretrainingSums(device, args.next_sentence)
        needed = args.batch_size * info.world_size
        if len(self.windows["train"]) < needed:
            raise UserError(
                f"the train split of {args.dataset} has {len(splits['train'].ids)} tokens, fewer "
                f"than one batch ({needed} sequences of {args.bptt - 1} tokens)")
        for split in ("valid", "test"):
            if len(self.windows[split]) == 0:
                raise UserError(f"the {split} split of {args.dataset} has fewer than "
                                f"{args.bptt - 1} tokens: not one sequence")

    def _batches(self, windows, order, epoch, masking, pairs=False):
        a = self.args
        if pairs:  # --next-sentence's training batches
            make_batch = functools.partial(data.mlm_pair_batch, windows,
                                           (self.vocab.cls_id, self.vocab.sep_id), masking,
                                           a.seed, epoch)
        else:
            make_batch = functools.partial(data.mlm_batch, windows, self.vocab.cls_id,
                                           masking, a.seed, epoch)
        return data.Batches(make_batch, order, a.batch_size)

    def train_batches(self, epoch):
        a = self.args
        order = data.epoch_order(len(self.windows["train"]), a.seed, epoch, shuffle=True,
                                 rank=self.info.rank, world_size=self.info.world_size,
                                 batch_size=a.batch_size)
        return self._batches(self.windows["train"], order, epoch, self.masking,
                             pairs=self.args.next_sentence)

    def eval_batches(self, split):
        """The sequences of a split (all, or --eval-batches' sample), masked the same way
        whatever the training masks (EVAL_MASKING), every epoch and with any number of
        ranks."""
        windows = self.windows[split]
        order = data.evaluation_order(len(windows), self.args.batch_size,
                                      self.args.eval_batches)
        masking = data.Masking.of(self.vocab, *EVAL_MASKING)
        return self._batches(windows, order, f"eval-{split}", masking)

    @staticmethod
    def mlm_loss(model, batch, reduction="mean"):
        logits = model(batch["inputs"], batch["masked_positions"])  # MLM batches have no padding
        return F.cross_entropy(logits.float(), batch["targets"], reduction=reduction)

    def loss(self, model, batch):
        """The MLM loss; with --next-sentence, plus the next-sentence loss (BERT's sum)."""
        if "ns_labels" not in batch:
            return self.mlm_loss(model, batch)
        logits, ns_logits = model(batch["inputs"], batch["masked_positions"],
                                  batch["token_types"], next_sentence=True)
        mlm_loss = F.cross_entropy(logits.float(), batch["targets"])
        self.ns_sums.add_mlm(mlm_loss)
        self.ns_sums.add_ns(ns_logits.float(), batch["ns_labels"])
        return mlm_loss + F.cross_entropy(ns_logits.float(), batch["ns_labels"])

    def evaluate(self, model, split):
        """Mean loss over the masked tokens of eval_batches, on their fixed masks; and how
        many tokens were scored."""
        loss_sum, n_targets = trainer.evaluation_sums(
            model, self.eval_batches(split), self._sums, 2, self.info, self.device,
            self.args.dtype)
        loss = loss_sum / n_targets
        return {"loss": loss, "ppl": logs.perplexity(loss), "tokens": int(n_targets)}

    def _sums(self, model, batch):
        loss_sum = self.mlm_loss(model, batch, reduction="sum").double()
        return torch.stack([loss_sum, loss_sum.new_tensor(batch["targets"].numel())])

    def training_metrics(self, loss):
        """The perplexity of the training loss; with --next-sentence, of its MLM part, and
        the next-sentence accuracy."""
        return self.ns_sums.read_and_reset(loss)

    def save_best(self, model):
        """full_mlm_model.pt: the MLM model; with --next-sentence, the MLM model and the
        trained pooler (the next-sentence classifier is left out: no task uses it)."""
        parts = ({"state": model.mlm_state_dict(), "pooler": model.pooler.state_dict()}
                 if isinstance(model, PreTrainingTask) else {})
        checkpoint.save_model("mlm", model, self.config, self.vocab, self.best_model_path,
                              run=self.run, **parts)

    def write_outputs(self, model):
        checkpoint.save_encoder(model, self.config, self.vocab, self.outputs["--save"][0],
                                run=self.run)


def outputs(args):
    """{flag: (path, what)} of the files a run writes (besides the Trainer's)."""
    return mains.encoder_outputs(args, best_model="full_mlm_model.pt", loss_log="mlm_loss.txt")


def start_from(args, log):
    """(config, tokenizer, checkpoint.starting_weights) of --bert-model, or (None, None,
    None) for a new model, whose tokenizer (--tokenizer) corpus.load_splits chooses."""
    if args.bert_model is None:
        return None, None, None
    if args.tokenizer is not None:
        raise UserError(f"--tokenizer {args.tokenizer}: --bert-model {args.bert_model} "
                        "brings its own tokenizer; leave --tokenizer out")
    ckpt = checkpoint.load_checkpoint(args.bert_model, "--bert-model")
    # A full MLM model continues with its head; an encoder gets a fresh head.
    weights = checkpoint.starting_weights(ckpt, "mlm", args.bert_model, args.evaluate_only)
    config, vocab = checkpoint.config_and_vocab(ckpt, "--bert-model", args.bert_model)
    return flags.model_config(config, args, args.bert_model, log), vocab, weights


def fresh_config(args, vocab=None):
    """The BertConfig of a new model: FRESH_MODEL's sizes, the flags given replacing them.
    Without the vocab (not built yet), the sizes alone are checked."""
    sizes = {name: value if getattr(args, name) is None else getattr(args, name)
             for name, value in FRESH_MODEL.items()}
    try:
        return BertConfig(vocab_size=len(vocab) if vocab else 1, max_len=max(512, args.bptt),
                          pad_id=vocab.pad_id if vocab else 0, **sizes)
    except ValueError as e:  # flags that do not make a model, e.g. --emsize 30 --nhead 4
        raise UserError(f"the model flags do not make a BERT: {e}") from None


def build_model(args, config, weights, device):
    """MLMTask, or with --next-sentence PreTrainingTask, new or of --bert-model's weights
    (an MLM model's; an encoder's, with its pooler where it has one)."""
    task_class = PreTrainingTask if args.next_sentence else MLMTask
    if weights is None:
        return task_class(config).to(device)
    return checkpoint.task_model(task_class, config, weights, args.bert_model, device)


def main(args, info):
    log, device = mains.start(args, info)
    recipes.split_global_batch(args, info.world_size)
    if args.next_sentence and args.bptt < 5:
        raise UserError(f"--next-sentence: --bptt {args.bptt} has no room for <cls> A <sep> B "
                        "<sep>; give --bptt 5 or more")
    spec = flags.settings(TokenizerSpec, args)
    if args.bert_model is None:
        if args.evaluate_only:
            raise UserError("--evaluate-only needs --bert-model: the model to evaluate "
                            "(full_mlm_model.pt, or a transformers BERT folder with its MLM head)")
        fresh_config(args)  # sizes that make no model are refused before any file is touched
    train_config = flags.train_config(args)
    checks.prepare_run(
        info, inputs={"--bert-model": args.bert_model,
                      "--tokenizer": None if spec.learned else spec.tokenizer},
        outputs=checks.run_outputs(outputs(args), train_config),
        data_dir=args.data_dir, also_read=corpus.dataset_inputs(args.dataset, args.data_dir),
        owner=checks.Owner.of(vars(args), trains=not args.evaluate_only))
    config, vocab, weights = start_from(args, log)
    # Rank 0 builds the vocab and the token caches; the other ranks then read them.
    with distributed.main_rank_first(info):
        vocab, splits = corpus.load_splits(args.dataset, args.data_dir, vocab=vocab, spec=spec,
                                           vocab_path=args.save_vocab, log=log)
    config = config or fresh_config(args, vocab)
    if args.recipe:
        log(recipes.recipe_summary(args, info.world_size, config.dropout))
    task = MLM(args, vocab, splits, config, info, device)
    model = build_model(args, config, weights, device)
    start = f"from {args.bert_model}" if args.bert_model else "new"
    trainer.run(task, model, train_config, info, device, log,
                start=f"{start}, {len(splits['train'].ids)} train tokens", flags=vars(args))


if __name__ == "__main__":
    mains.launch(main, flags.parse_args(get_parser()))

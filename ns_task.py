"""Next-sentence training of a pretrained BERT encoder.

    python ns_task.py --bert-model mlm_bert.pt      # -> ns_bert.pt
"""

import functools

import bertkit.cpu_threads  # noqa: F401 (OpenMP's wait policy, before torch loads)

import torch
import torch.nn.functional as F

import data
from bertkit import checkpoint, checks, flags, mains, recipes
from bertkit.files import UserError
from bertkit.text import corpus
from bertkit.training import distributed, logs, trainer
from model import NextSentenceTask


def get_parser():
    parser = flags.ArgumentParser(prog="ns_task.py", description="BERT next-sentence task")
    parser.add_argument("--bert-model", type=str, default="mlm_bert.pt",
                        help="pretrained encoder (or any task checkpoint holding one); "
                             "architecture and vocab come from it (default mlm_bert.pt)")
    flags.add_dataset_flag(parser, default="WikiText103")
    parser.add_argument("--frac_ns", type=float, default=0.5,
                        help="fraction of pairs whose second part comes from another line (default 0.5)")
    parser.add_argument("--min_sentence_len", type=int, default=60,
                        help="lines shorter than this many tokens are not used (default 60)")
    recipes.add_recipe_flag(parser)
    flags.add_evaluate_only_flag(parser)
    flags.add_model_flags(parser)
    flags.add_common_flags(parser, lr=0.25, clip=0.1, epochs=5, batch_size=24, bptt=128,
                           seed=312216194, log_interval=600, save="ns_bert.pt",
                           state_file="ns_state.pt")
    return parser


class NextSentence:
    """What the shared Trainer needs to know about the next-sentence task."""

    best_metric = ("loss", "min")

    def __init__(self, args, vocab, splits, config, info, device):
        self.args, self.vocab, self.splits, self.config = args, vocab, splits, config
        self.info, self.device = info, device
        self.outputs, self.run = outputs(args), checks.run_record(vars(args))
        self.best_model_path = self.outputs["the best model"][0]
        self.accuracy = logs.TrainingAccuracy(device)  # of the training pairs, for the log
        self.pairs = flags.settings(data.Pairs, args)
        for split in data.SPLITS:
            n = len(splits[split].lines(self.pairs.min_sentence_len))
            needed = args.batch_size * info.world_size if split == "train" else 1
            if n < needed:
                raise UserError(
                    f"the {split} split of {args.dataset} has {n} lines of at least "
                    f"--min_sentence_len {self.pairs.min_sentence_len} tokens; {needed} needed")
        self.eval_pairs = {
            s: data.ns_pairs(splits[s], self.pairs, data.batch_generator(args.seed, "pairs", s))
            for s in ("valid", "test")
        }

    def _batches(self, split, pairs, order):
        specials = (self.vocab.cls_id, self.vocab.sep_id, self.vocab.pad_id)
        make_batch = functools.partial(data.ns_batch, self.splits[split], pairs, self.args.bptt,
                                       specials)
        return data.Batches(make_batch, order, self.args.batch_size)

    def train_batches(self, epoch):
        a = self.args
        pairs = data.ns_pairs(self.splits["train"], self.pairs,
                              data.batch_generator(a.seed, "pairs", epoch))
        order = data.epoch_order(len(pairs["label"]), a.seed, epoch, shuffle=True,
                                 rank=self.info.rank, world_size=self.info.world_size,
                                 batch_size=a.batch_size)
        return self._batches("train", pairs, order)

    @staticmethod
    def logits(model, batch):
        return model(batch["inputs"], batch["token_types"], batch.get("padding_mask")).float()

    def loss(self, model, batch):
        logits = self.logits(model, batch)
        self.accuracy.add(logits, batch["labels"])
        return F.cross_entropy(logits, batch["labels"])

    def training_metrics(self, loss):
        return self.accuracy.read_and_reset()

    def evaluate(self, model, split):
        """Mean loss and accuracy over the split's fixed pairs (all, or --eval-batches'
        sample), and how many pairs were scored."""
        pairs = self.eval_pairs[split]
        order = data.evaluation_order(len(pairs["label"]), self.args.batch_size,
                                      self.args.eval_batches)
        loss_sum, n_right, n_pairs = trainer.evaluation_sums(
            model, self._batches(split, pairs, order), self._sums, 3, self.info, self.device,
            self.args.dtype)
        return {"loss": loss_sum / n_pairs, "accuracy": 100 * n_right / n_pairs,
                "pairs": int(n_pairs)}

    def _sums(self, model, batch):
        logits, labels = self.logits(model, batch), batch["labels"]
        loss_sum = F.cross_entropy(logits, labels, reduction="sum").double()
        return torch.stack([loss_sum, (logits.argmax(-1) == labels).sum().double(),
                            loss_sum.new_tensor(len(labels))])

    def save_best(self, model):
        checkpoint.save_model("ns", model, self.config, self.vocab, self.best_model_path,
                              run=self.run)

    def write_outputs(self, model):
        checkpoint.save_encoder(model, self.config, self.vocab, self.outputs["--save"][0],
                                run=self.run)


def outputs(args):
    """{flag: (path, what)} of the files a run writes (besides the Trainer's)."""
    return mains.encoder_outputs(args, best_model="ns_model.pt", loss_log="ns_loss.txt")


def main(args, info):
    log, device = mains.start(args, info)
    recipes.split_global_batch(args, info.world_size)
    train_config = flags.train_config(args)
    checks.prepare_run(info, inputs={"--bert-model": args.bert_model},
                       outputs=checks.run_outputs(outputs(args), train_config),
                       data_dir=args.data_dir,
                       also_read=corpus.dataset_inputs(args.dataset, args.data_dir),
                       owner=checks.Owner.of(vars(args), trains=not args.evaluate_only))
    weights, config, vocab = flags.fine_tuning_start(args, info, log, "ns")
    with distributed.main_rank_first(info):
        _, splits = corpus.load_splits(args.dataset, args.data_dir, vocab=vocab, log=log)
    task = NextSentence(args, vocab, splits, config, info, device)
    model = checkpoint.task_model(NextSentenceTask, config, weights, args.bert_model, device)
    trainer.run(task, model, train_config, info, device, log, start=f"from {args.bert_model}",
                flags=vars(args))


if __name__ == "__main__":
    mains.launch(main, flags.parse_args(get_parser()))

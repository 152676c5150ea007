"""Masked-language-model pretraining of a BERT encoder.

    python mlm_task.py            # WikiText-2, BERT-base size -> mlm_bert.pt
"""

import argparse
import functools
import math

import torch
import torch.nn.functional as F

import checkpoint
import corpus
import data
import trainer
import utils
from model import BertConfig, MLMTask, count_parameters


def get_parser():
    parser = argparse.ArgumentParser(description="BERT masked-language-model pretraining")
    utils.add_model_flags(parser, emsize=768, nhid=3072, nlayers=12, nhead=12, dropout=0.2)
    parser.add_argument("--mask_frac", type=float, default=0.15,
                        help="fraction of the tokens of each sequence that are masked (default 0.15)")
    parser.add_argument("--mask-mode", type=str, default="mask", choices=["mask", "bert"],
                        help="mask: every masked token becomes <MASK> (the old example); bert: "
                             "80%% <MASK>, 10%% random word, 10%% unchanged (default mask)")
    utils.add_dataset_flag(parser, default="WikiText2")
    parser.add_argument("--min-freq", type=int, default=1,
                        help="words seen fewer times in the train split become <unk> (default 1)")
    utils.add_common_flags(parser, lr=6.0, clip=0.1, epochs=8, batch_size=32, bptt=128,
                           seed=5431916812, log_interval=10, save="mlm_bert.pt",
                           state_file="mlm_state.pt")
    return parser


# Validation and test perplexity are measured on the same masks whatever --mask_frac and
# --mask-mode train with (15% of positions, all <MASK>: the old example's masking), so runs
# with different training masks compare.
EVAL_MASKING = (0.15, "mask")


class MLM:
    """What the shared Trainer needs to know about masked-LM pretraining."""

    full_model_path = "full_mlm_model.pt"
    loss_format = "5.2f"  # the old example's end-of-training line

    def __init__(self, args, vocab, splits, config, info, device):
        self.args, self.vocab, self.config, self.info, self.device = args, vocab, config, info, device
        self.windows = {s: data.mlm_windows(splits[s], args.bptt) for s in data.SPLITS}
        needed = args.batch_size * info.world_size
        if len(self.windows["train"]) < needed:
            raise utils.UserError(
                f"the train split of {args.dataset} has {len(splits['train'].ids)} tokens, fewer "
                f"than one batch ({needed} sequences of {args.bptt - 1} tokens)")
        for split in ("valid", "test"):
            if len(self.windows[split]) == 0:
                raise utils.UserError(f"the {split} split of {args.dataset} has fewer than "
                                      f"{args.bptt - 1} tokens: not one sequence")

    def _batches(self, windows, order, epoch, mask_frac, mask_mode):
        a = self.args
        make_batch = functools.partial(data.mlm_batch, windows, mask_frac, len(self.vocab),
                                       mask_mode, a.seed, epoch)
        return data.Batches(make_batch, order, a.batch_size)

    def train_batches(self, epoch):
        a = self.args
        order = data.epoch_order(len(self.windows["train"]), a.seed, epoch, shuffle=True,
                                 rank=self.info.rank, world_size=self.info.world_size,
                                 batch_size=a.batch_size)
        return self._batches(self.windows["train"], order, epoch, a.mask_frac, a.mask_mode)

    def eval_batches(self, split):
        """Every sequence of a split, masked the same way whatever the training masks
        (EVAL_MASKING), every epoch and with any number of ranks."""
        windows = self.windows[split]
        return self._batches(windows, torch.arange(len(windows)), f"eval-{split}", *EVAL_MASKING)

    @staticmethod
    def loss(model, batch, reduction="mean"):
        logits = model(batch["inputs"], batch["masked_positions"])  # MLM batches have no padding
        return F.cross_entropy(logits.float(), batch["targets"], reduction=reduction)

    def evaluate(self, model, split):
        """Mean loss over every masked token of the split, on eval_batches' fixed masks."""
        loss_sum, n_targets = trainer.evaluation_sums(
            model, self.eval_batches(split), self._sums, 2, self.info, self.device,
            self.args.dtype)
        loss = loss_sum / n_targets
        return loss, loss, f"{split} ppl {math.exp(min(loss, 700)):8.2f}"

    def _sums(self, model, batch):
        loss_sum = self.loss(model, batch, reduction="sum").double()
        return torch.stack([loss_sum, loss_sum.new_tensor(batch["targets"].numel())])

    def save_best(self, model):
        checkpoint.save_model("mlm", model, self.config, self.vocab, self.full_model_path)


def main(args, info):
    log = utils.make_logger(info)
    device = utils.setup_device(args, info)
    torch.manual_seed(args.seed)
    if args.bptt < 2 or args.batch_size < 1 or not 0 < args.mask_frac < 1:
        raise utils.UserError("--bptt must be at least 2, --batch_size at least 1, and "
                              "--mask_frac between 0 and 1")
    # Rank 0 builds the vocab and the token caches; the other ranks then read them.
    with utils.main_rank_first(info):
        vocab, splits = corpus.load_splits(args.dataset, args.data_dir, min_freq=args.min_freq,
                                           vocab_path=args.save_vocab, log=log)
    config = BertConfig(vocab_size=len(vocab), emsize=args.emsize, nhead=args.nhead,
                        nhid=args.nhid, nlayers=args.nlayers, dropout=args.dropout,
                        max_len=max(512, args.bptt), pad_id=data.PAD_ID)
    utils.apply_model_flags(config, args)
    task = MLM(args, vocab, splits, config, info, device)
    model = MLMTask(config).to(device)
    log(f"MLMTask: {count_parameters(model) / 1e6:.1f}M parameters, "
        f"vocab {len(vocab)}, {len(splits['train'].ids)} train tokens, device {device}, "
        f"{info.world_size} process(es)")
    trainer.train_and_test_encoder(task, model, args, info, device, log, "mlm_loss.txt")


if __name__ == "__main__":
    utils.launch(main, utils.parse_args(get_parser()))

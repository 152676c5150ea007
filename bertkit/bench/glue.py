"""GLUE fine-tuning and evaluation speed, ours against transformers: `python bench.py --glue`.

Ours is glue_task.py's path: model.SequenceClassificationTask trained on batches padded to
their longest pair (sentences.pair_batch), evaluated by classifier.score (pairs sorted by
length, each batch padded to its longest). Theirs is BertForSequenceClassification with
the same architecture, weights, optimizer (AdamW, clipping) and the same pairs, fed as
run_glue.py feeds it: every pair padded to 128 tokens (its default, pad_to_max_length),
or batches padded to their longest pair (DataCollatorWithPadding), in the same order as
ours in training and in file order in evaluation (transformers' Trainer evaluates in
order). The text is GLUE's RTE when it is there (glue/RTE in the folder $BERT_TEST_DATA
names), else synthetic sentences of SST-2's length distribution. Timed in one process,
interleaved (ours, theirs padded, theirs dynamic, ...), medians.

Fine-tuning throughput counts the pairs' real tokens per second (padding is work, not
tokens); evaluation counts sentences (pairs) per second. The last line:

    glue_train_padded R1 glue_train_dynamic R2 glue_eval_padded R3 glue_eval_dynamic R4

each ours / theirs (> 1: ours is faster).
"""

import random
from functools import partial
from pathlib import Path

import torch

import data
import utils
from bertkit.bench.timing import REAL_DATA, interleaved_medians, seconds_per_call
from bertkit.glue import classifier, sentences
from bertkit.glue import tasks as glue
from bertkit.glue.classifier import Rows
from bertkit.text import tokenizer
from bertkit.training import optimizer
from bertkit.transformers_format import ours_to_transformers_state_dict, their_bert_config
from model import BertConfig, SequenceClassificationTask

SEQ_LEN = 128  # run_glue.py's max_seq_length, and glue_task.py's --bptt
RTE_DIR = REAL_DATA / "glue" / "RTE"
VOCAB_TXT = REAL_DATA / "bert-base-uncased" / "vocab.txt"
VOCAB_SIZE = 30522  # BERT's


def synthetic_sst2(n, seed):
    """Single sentences of SST-2's lengths (its dev set: 19 words on average, 2 to 52;
    drawn log-normally around that) of random words, labels 0 / 1."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choices(words, k=min(52, max(2, round(rng.lognormvariate(2.8, 0.55))))))
             for _ in range(n)]
    return glue.Examples("synthetic", texts, None, [rng.choice("01") for _ in range(n)],
                         [str(i) for i in range(n)])


def bench_text(rte_dir, seed):
    """(train examples, dev examples, what they are): RTE's, else synthetic SST-2-like."""
    task = glue.TASKS["RTE"]
    if rte_dir is not None and (Path(rte_dir) / "train.tsv").is_file():
        return (glue.read_task_file(Path(rte_dir) / "train.tsv", task, "train"),
                glue.read_task_file(Path(rte_dir) / "dev.tsv", task, "dev"), f"RTE ({rte_dir})")
    return synthetic_sst2(2000, seed), synthetic_sst2(872, seed + 1), "synthetic SST-2-like text"


def bench_vocab(examples, vocab_file):
    """BERT's WordPiece vocabulary when vocab_file is there; else the texts' words and
    fillers up to BERT's vocabulary size (the embedding's cost is that of a real one)."""
    if vocab_file is not None and Path(vocab_file).is_file():
        return tokenizer.load_tokenizer(vocab_file)
    words = {w for e in examples for t in (*e.texts_a, *(e.texts_b or ()))
             for w in tokenizer.basic_english_normalize(t)}
    itos = list(tokenizer.SPECIALS) + sorted(words)
    return tokenizer.Vocab(itos + [f"<filler{i}>" for i in range(VOCAB_SIZE - len(itos))])


def glue_models(arch, vocab, n_labels, dropout, device, seed):
    """(ours, theirs): the same weights, transformers' attention by SDPA."""
    import transformers  # a dev/test dependency only

    config = BertConfig(vocab_size=len(vocab), dropout=dropout, max_len=512,
                        pad_id=vocab.pad_id, **arch)
    torch.manual_seed(seed)
    ours = SequenceClassificationTask(config, n_labels)
    their_config = their_bert_config(config)
    their_config.num_labels = n_labels
    theirs = transformers.BertForSequenceClassification(their_config)
    theirs.load_state_dict(ours_to_transformers_state_dict(ours.state_dict()))
    return ours.to(device), theirs.to(device)


def their_batch(batch):
    """One of our batches as transformers' keyword arguments."""
    out = {"input_ids": batch["inputs"], "token_type_ids": batch["token_types"],
           "attention_mask": batch["padding_mask"].long()}
    if "labels" in batch:
        out["labels"] = batch["labels"]
    return out


def training_batches(rows, pad_id, batch_size, n_batches, seed, device):
    """{"ours", "padded", "dynamic"}: the same n_batches batches of shuffled pairs (as
    glue_task.py draws them), padded to their longest pair (ours; theirs with
    DataCollatorWithPadding: the same tensors) or to SEQ_LEN (run_glue.py's default)."""
    order = data.epoch_order(len(rows.encoded), seed, 1, shuffle=True, batch_size=batch_size)
    batches = {"ours": [], "padded": [], "dynamic": []}
    for i in range(n_batches):
        picked = order[i * batch_size:(i + 1) * batch_size]
        dynamic = sentences.pair_batch(rows.encoded, rows.labels, pad_id, i, picked)
        padded = sentences.pair_batch(rows.encoded, rows.labels, pad_id, i, picked, SEQ_LEN)
        batches["ours"].append(utils.to_device(dynamic, device))
        batches["dynamic"].append(utils.to_device(their_batch(dynamic), device))
        batches["padded"].append(utils.to_device(their_batch(padded), device))
    tokens = sum(int(b["padding_mask"].sum()) for b in batches["ours"])
    return batches, tokens


def train_steps(model, batches, loss, device, dtype):
    """One call: a training step on each batch (AdamW, clipping, as glue_task.py's)."""
    adamw = torch.optim.AdamW(optimizer.param_groups(model, 0.01), lr=2e-5,
                              fused=optimizer.fused_adamw_works(device.type) or None)

    def run():
        model.train()
        for batch in batches:
            with utils.autocast(device, dtype):
                value = loss(model, batch)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            adamw.step()
            adamw.zero_grad(set_to_none=True)

    return run


def our_loss(model, batch):
    logits = model(batch["inputs"], batch["token_types"], batch["padding_mask"])
    return classifier.loss(logits, batch["labels"])


def their_loss(model, batch):
    return model(**batch).loss


@torch.inference_mode()
def their_predictions(model, batches):
    """transformers' evaluation: one forward per batch, in file order, the argmax."""
    model.eval()
    return torch.cat([model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
                      for batch in batches]).cpu()


def eval_calls(ours, theirs, rows, pad_id, batch_size, device):
    """{name: fn} of the three evaluations of every dev pair, each returning the
    predicted label ids in file order."""
    order = torch.arange(len(rows.encoded)).split(batch_size)
    padded, dynamic = ([utils.to_device(their_batch(sentences.pair_batch(
        rows.encoded, None, pad_id, i, picked, seq_len)), device)
        for i, picked in enumerate(order)] for seq_len in (SEQ_LEN, None))

    def run_ours():
        with torch.inference_mode():
            return classifier.score(ours, rows, pad_id, batch_size, device)[0].argmax(-1)

    return {"ours": run_ours, "padded": partial(their_predictions, theirs, padded),
            "dynamic": partial(their_predictions, theirs, dynamic)}


def bench_glue(arch, batch_size, rounds, steps, device, dtype="fp32", seed=0, rte_dir=RTE_DIR,
               vocab_file=VOCAB_TXT, dropout=0.1, n_eval=0):
    """(train ratios, eval ratios), each {"padded": ours / theirs, "dynamic": ...}:
    fine-tuning tokens/s over `steps` batches a round and evaluation sentences/s over the
    dev pairs (`n_eval` of them, 0: all), `rounds` rounds after one of warm-up."""
    train, dev, what = bench_text(rte_dir, seed)
    if n_eval:
        dev = glue.Examples(dev.path, dev.texts_a[:n_eval], dev.texts_b and dev.texts_b[:n_eval],
                            dev.labels[:n_eval], dev.indices[:n_eval])
    vocab = bench_vocab((train, dev), vocab_file)
    labels = glue.sorted_labels(train.labels)
    train_rows, dev_rows = (Rows.of(e, vocab, SEQ_LEN, labels) for e in (train, dev))
    ours, theirs = glue_models(arch, vocab, len(labels), dropout, device, seed)
    batches, tokens = training_batches(train_rows, vocab.pad_id, batch_size, steps, seed, device)
    train_calls = {"ours": train_steps(ours, batches["ours"], our_loss, device, dtype),
                   **{mode: train_steps(theirs, batches[mode], their_loss, device, dtype)
                      for mode in ("padded", "dynamic")}}
    evals = eval_calls(ours, theirs, dev_rows, vocab.pad_id, batch_size, device)
    found = {name: fn() for name, fn in evals.items()}  # warm-up: its answers are compared
    for fn in train_calls.values():
        seconds_per_call(fn, 1, device)
    calls = {**{f"train {k}": (fn, 1) for k, fn in train_calls.items()},
             **{f"eval {k}": (fn, 1) for k, fn in evals.items()}}
    median = interleaved_medians(calls, rounds, device)
    real = dev_rows.encoded.lengths.float()
    print(f"glue: {what}, {len(train_rows.encoded)} train and {len(dev_rows.encoded)} dev pairs "
          f"(mean {real.mean():.1f} tokens, {100 * real.mean() / SEQ_LEN:.0f}% of {SEQ_LEN}), "
          f"vocab {len(vocab)}, batch {batch_size}, dropout {dropout}")
    train_tps = {k: tokens / median[f"train {k}"] for k in train_calls}
    eval_sps = {k: len(dev_rows.encoded) / median[f"eval {k}"] for k in evals}
    print(f"glue train: ours {train_tps['ours']:.0f} tokens/s, transformers padded to "
          f"{SEQ_LEN} {train_tps['padded']:.0f}, dynamic padding {train_tps['dynamic']:.0f}")
    agree = float((found["ours"] == found["padded"]).float().mean())
    print(f"glue eval: ours {eval_sps['ours']:.1f} sentences/s, transformers padded to "
          f"{SEQ_LEN} {eval_sps['padded']:.1f}, dynamic padding {eval_sps['dynamic']:.1f}; the "
          f"same label for {100 * agree:.1f}% of the pairs")
    return ({k: train_tps["ours"] / train_tps[k] for k in ("padded", "dynamic")},
            {k: eval_sps["ours"] / eval_sps[k] for k in ("padded", "dynamic")})


def summary(train, evaluation):
    """bench.py --glue's last line."""
    return (f"glue_train_padded {train['padded']:.3f} glue_train_dynamic {train['dynamic']:.3f} "
            f"glue_eval_padded {evaluation['padded']:.3f} "
            f"glue_eval_dynamic {evaluation['dynamic']:.3f}")

"""Time our MLM training step against transformers' BertForMaskedLM, side by side.

A short copy of the training step that only measures (as nanoGPT's bench.py):

    python bench.py --config small --quick
    python bench.py --config base --quick
    python bench.py --loop --config small --quick   # the real loop against its bare step
    python bench.py --glue --config small --quick   # GLUE fine-tuning and evaluation
    python bench.py --pretrain --quick              # --size tiny and mini, fp32 and bf16

Ours and theirs run in one process on one device with the same architecture, weights,
batch and optimizer, interleaved (ours, theirs, ours, theirs, ...) so that a busy
neighbour or a clock change hits both alike; every number printed is a median. The
last line is machine-readable:

    mlm_train_ratio R qa_infer_ratio Q mfu M

R and Q are throughputs, ours / transformers (> 1: ours is faster); M is the model
FLOP/s of our training step over the matmul FLOP/s this device reaches (matmul_calls).
With --glue, bertkit/bench/glue.py's `glue_train_padded ... glue_eval_dynamic` ratios. With --loop
the last line is `loop_ratio L batch_ms B`: the tokens/s of bertkit/training/trainer.py's loop
over those of its bare step (1: the loop costs nothing beyond the step), and the
milliseconds one 64x128 MLM batch takes to build.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import utils
from bertkit.bench.timing import REAL_DATA, interleaved_medians, seconds_per_call
from bertkit.squad import answers, windows
from bertkit.squad import dataset as squad
from bertkit.text import tokenizer
from bertkit.training import distributed, trainer
from bertkit.transformers_format import ours_to_transformers_state_dict, their_bert_config
from model import BertConfig, MLMTask, QuestionAnswerTask, flops_per_token_train

VOCAB_SIZE = 28785  # the pretraining recipe's WikiText-103 vocabulary
SEQ_LEN = 128
# 15% masked: the same count in every row, so every step does the same work.
N_MASKED = round(0.15 * SEQ_LEN)
# Architectures compared; timing as (rounds, training steps per round) for --quick and
# without it (--quick: about 75 s on an idle 2-core CPU, several times that on a busy one);
# SQuAD questions in the QA benchmark (0: all of the file); --loop's (rounds, steps) with
# and without --quick; --glue's batch and (rounds, batches a round) with and without --quick.
CONFIGS = {
    "small": dict(emsize=256, nlayers=4, nhead=4, nhid=1024, batch_size=16,
                  quick=(9, 2), full=(15, 5), qa_questions=0, loop=((5, 8), (9, 16)),
                  glue=(32, (5, 2), (9, 4))),
    "base": dict(emsize=768, nlayers=12, nhead=12, nhid=3072, batch_size=8,
                 quick=(3, 1), full=(10, 2), qa_questions=12, loop=((3, 3), (6, 6)),
                 glue=(8, (3, 1), (5, 2))),
}
ARCH = ("emsize", "nlayers", "nhead", "nhid")
# Real inputs (bench_timing.REAL_DATA), when there.
SQUAD_FILE = REAL_DATA / "squad" / "train-v1.1-notre-dame.json"
TEXT_FILE = REAL_DATA / "wikitext-2" / "wiki.valid.tokens"


###############################################################################
# Timing
###############################################################################


def training_dtype(device):
    """bf16 on GPUs that compute in it natively (emulated bf16 is slower than fp32, and
    would set a different MFU denominator); fp32 on the CPU, the precision the targets
    are set in."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # is_bf16_supported asks about the current device
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return "bf16"
    return "fp32"


###############################################################################
# MLM training: ours against transformers
###############################################################################


def mlm_batch(batch_size, seq_len, n_masked, vocab_size, generator):
    """Random tokens (no pad id), n_masked positions per row as MLMTask takes them: a
    (batch, n_masked) tensor, each row sorted; and transformers' labels: the tokens at
    those positions, -100 elsewhere."""
    src = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)
    scores = torch.rand(batch_size, seq_len, generator=generator)
    masked_positions = scores.topk(n_masked, dim=1).indices.sort(dim=1).values
    labels = torch.full_like(src, -100)
    labels.scatter_(1, masked_positions, src.gather(1, masked_positions))
    return src, masked_positions, labels


def sgd_step(forward_loss, optimizer, device, dtype):
    """One training step; returns the loss (a tensor: reading it would wait for the device)."""
    # PyTorch's AMP recipe: autocast the forward and the loss only.
    with utils.autocast(device, dtype):
        loss = forward_loss()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def mlm_steps(config, batch_size, device, dtype, seed, compile=False):
    """{"ours": step, "theirs": step}: one training step each, on the same batch, from the
    same weights, with the same optimizer."""
    import transformers  # a dev/test dependency only

    torch.manual_seed(seed)
    ours = MLMTask(config)
    theirs = transformers.BertForMaskedLM(their_bert_config(config))
    theirs.load_state_dict(ours_to_transformers_state_dict(ours.state_dict()))
    # Same dropout probability and placement in both (ours draws its CPU masks faster).
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    ours_fwd, theirs_fwd = (torch.compile(m) if compile else m for m in (ours, theirs))
    # Drawn on the CPU (a CPU generator): the same batch on every device.
    batch = mlm_batch(batch_size, SEQ_LEN, N_MASKED, config.vocab_size,
                      torch.Generator().manual_seed(seed))
    src, masked_positions, labels = (t.to(device) for t in batch)
    targets = src.gather(1, masked_positions).flatten()  # row-major, as MLMTask's logits

    def ours_loss():  # as mlm_task.py: an unpadded batch, so no padding mask
        return F.cross_entropy(ours_fwd(src, masked_positions).float(), targets)

    def theirs_loss():  # as users run it: logits at every position, labels -100 ignored
        return theirs_fwd(input_ids=src, labels=labels).loss

    # The recipe's optimizer (trainer.Trainer): plain SGD. foreach=True and fused=True
    # measured no faster on CPU (the step is ~1% of ours and memory bound).
    return {name: partial(sgd_step, loss, torch.optim.SGD(m.parameters(), lr=1e-4), device, dtype)
            for name, m, loss in (("ours", ours, ours_loss), ("theirs", theirs, theirs_loss))}


def bench_mlm(config, batch_size, rounds, steps, device, dtype="fp32", seed=0, compile=False,
              also_time=None):
    """MLM training throughput in tokens/s, (ours, theirs); with the median seconds of
    each {name: fn} in `also_time`, called 3 times in each of the same rounds."""
    calls = {name: (fn, steps)
             for name, fn in mlm_steps(config, batch_size, device, dtype, seed, compile).items()}
    calls.update({name: (fn, 3) for name, fn in (also_time or {}).items()})
    for fn, _ in calls.values():  # warm-up: allocator, compilation, cuBLAS handles
        seconds_per_call(fn, 1, device)
    median = interleaved_medians(calls, rounds, device)
    ours_s, theirs_s = median.pop("ours"), median.pop("theirs")
    tokens = batch_size * SEQ_LEN
    print(f"mlm train: ours {tokens / ours_s:.0f} tok/s ({ours_s * 1e3:.0f} ms/step), "
          f"transformers {tokens / theirs_s:.0f} tok/s ({theirs_s * 1e3:.0f} ms/step), "
          f"ratio {theirs_s / ours_s:.2f}")
    return tokens / ours_s, tokens / theirs_s, median


###############################################################################
# Matmul peak: MFU's denominator
###############################################################################


def matmul_calls(device, dtype, ffn_shape):
    """{name: (FLOPs per call, fn)}: products whose fastest rate is this device's matmul
    FLOP/s. A large square product and the model's own largest encoder product,
    `ffn_shape` = (batch*seq, emsize, nhid); each with PyTorch's matmul, which our linear
    layers use."""
    n = 2048 if device.type == "cpu" else 8192
    # Operands in the training precision up front: under autocast the casts of fp32
    # operands would be timed with the product.
    operand_dtype = utils.DTYPES[dtype]
    calls = {}
    for name, (rows, inner, cols) in {"square": (n, n, n), "ffn": ffn_shape}.items():
        a = torch.randn(rows, inner, device=device, dtype=operand_dtype)
        b = torch.randn(inner, cols, device=device, dtype=operand_dtype)
        flops, label = 2 * rows * inner * cols, f"{name} {rows}x{inner}x{cols}"
        calls[f"{label} torch.mm"] = (flops, partial(torch.mm, a, b))
    return calls


def matmul_peak(calls, seconds):
    """The fastest FLOP/s of `calls` (see matmul_calls) given their median seconds."""
    flops = {name: calls[name][0] / seconds[name] for name in calls}
    print("matmul: " + ", ".join(f"{name} {f / 1e9:.1f} GFLOP/s" for name, f in flops.items()))
    return max(flops.values())


###############################################################################
# QA evaluation: ours against transformers
###############################################################################


def synthetic_squad(n_paragraphs=60, questions_per_paragraph=5, seed=0):
    """SQuAD-layout data of random words, for machines without the real data: the answer
    to every question is the first words of its context."""
    g = random.Random(seed)
    words = [f"w{i}" for i in range(3000)]
    paragraphs = []
    for p in range(n_paragraphs):
        context = " ".join(g.choice(words) for _ in range(140)) + "."
        answer = {"text": context[:20].rsplit(" ", 1)[0], "answer_start": 0}
        qas = [{"id": f"{p}-{i}", "question": " ".join(g.choice(words) for _ in range(10)) + "?",
                "answers": [answer]} for i in range(questions_per_paragraph)]
        paragraphs.append({"context": context, "qas": qas})
    return {"data": [{"title": "synthetic", "paragraphs": paragraphs}]}


def squad_for_bench(folder, n_questions, squad_file=None):
    """`squad_file` (else synthetic text, said so) cut to about n_questions questions
    (whole paragraphs; 0: all), written as a SQuAD-layout JSON file in `folder`:
    (its path, where it came from, its number of questions)."""
    if squad_file is None:
        source, what = synthetic_squad(), "synthetic text"
    else:
        source, what = json.loads(Path(squad_file).read_text(encoding="utf-8")), str(squad_file)
    kept, count = [], 0
    for paragraph in (p for article in source["data"] for p in article["paragraphs"]):
        if n_questions and count >= n_questions:
            break
        kept.append(paragraph)
        count += len(paragraph["qas"])
    path = Path(folder) / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "bench", "paragraphs": kept}]}),
                    encoding="utf-8")
    return path, what, count


def their_qa_answers(model, path, vocab, windowing, batch_size, device, n_best=20):
    """transformers' way, as its run_qa.py example does it: every window padded to --bptt,
    one forward of BertForQuestionAnswering per batch, then its post-processing: the
    n_best start and end candidates of each window, checked one pair at a time."""
    import numpy as np

    questions, _ = squad.read_squad(path)
    cut = windows.make_windows(questions, vocab, windowing)
    best = {}  # question index -> (score, first context token, last context token)
    position = torch.arange(cut.tokens.size(1))
    with torch.inference_mode():
        for indices in torch.arange(len(cut)).split(batch_size):
            ids = cut.tokens[indices].long()
            lengths, offsets = cut.lengths[indices, None], cut.context_offset[indices, None]
            inputs = {"input_ids": ids, "attention_mask": (position < lengths).long(),
                      "token_type_ids": ((position >= offsets) & (position < lengths)).long()}
            out = model(**{k: v.to(device) for k, v in inputs.items()})
            # NumPy reads host memory only: the logits come back from the device first.
            starts, ends = (logits.float().cpu().numpy()
                            for logits in (out.start_logits, out.end_logits))
            for row, window in enumerate(indices.tolist()):
                offset, length = int(offsets[row]), int(lengths[row])
                question = int(cut.question[window])
                to_context = int(cut.context_start[window]) - offset
                for s in np.argsort(starts[row])[-1:-n_best - 1:-1].tolist():
                    for e in np.argsort(ends[row])[-1:-n_best - 1:-1].tolist():
                        if s < offset or e < offset or s >= length - 1 or e >= length - 1:
                            continue  # outside the context
                        if e < s or e - s + 1 > windowing.max_answer_len:
                            continue
                        score = float(starts[row][s] + ends[row][e])
                        if question not in best or score > best[question][0]:
                            best[question] = (score, s + to_context, e + to_context)
    found = {}
    for question, (score, first, last) in best.items():
        q, spans = cut.questions[question], cut.context_spans[question]
        found[q.qid] = (q.context[spans[first][0]:spans[last][1]], score)
    return found


def qa_vocab(questions):
    """The words of the questions and contexts, then fillers up to VOCAB_SIZE: the
    embedding has the size of the pretraining vocabulary (its cost does not depend on
    which ids occur)."""
    words = Counter(t for q in questions
                    for t in tokenizer.basic_english_normalize(q.context + " " + q.text))
    vocab = tokenizer.Vocab.build(words)
    return tokenizer.Vocab(vocab.itos + [f"<filler{i}>" for i in range(VOCAB_SIZE - len(vocab))])


def qa_models(arch, vocab_size, device, seed):
    """(ours, theirs) in eval mode with the same weights; qa_gelu=False, so that ours
    computes what BertForQuestionAnswering does."""
    import transformers  # a dev/test dependency only

    config = BertConfig(vocab_size=vocab_size, dropout=0.0, qa_gelu=False, pad_id=tokenizer.PAD_ID,
                        **{k: arch[k] for k in ARCH})
    torch.manual_seed(seed)
    ours = QuestionAnswerTask(config)
    theirs = transformers.BertForQuestionAnswering(their_bert_config(config))
    theirs.load_state_dict(ours_to_transformers_state_dict(ours.state_dict()))
    return ours.to(device).eval(), theirs.to(device).eval()


def answer_agreement(ours, theirs):
    """(fraction of questions with the same answer, questions that differ, of those the
    ones where ours found a higher-scoring span)."""
    differ = [q for q in ours if ours[q][0] != theirs.get(q, ("",))[0]]
    # Equal scores to 1e-4: a near-tie between spans may go either way.
    higher = sum(q not in theirs or ours[q][1] > theirs[q][1] + 1e-4 for q in differ)
    return 1 - len(differ) / len(ours), len(differ), higher


def bench_qa(arch, batch_size, device, squad_file=None, n_questions=0, rounds=2, seed=0):
    """QA evaluation throughput in questions/s, raw SQuAD JSON to answer strings, fp32,
    same weights: ours (bertkit/squad/answers.py's evaluation path) / transformers (BertForQuestionAnswering
    fed windows padded to --bptt, with its examples' post-processing). Both read and window
    the JSON the same way (the last window of a long context holds what is left of it, as
    in BERT and transformers' examples, so it is often short): the difference is the model
    call (ours: windows sorted by length, each batch cut to its longest window) and the
    decoding. `batch_size` is windows per forward, both models."""
    windowing = windows.Windowing()
    with tempfile.TemporaryDirectory() as folder:
        path, what, count = squad_for_bench(folder, n_questions, squad_file)
        vocab = qa_vocab(squad.read_squad(path)[0])
        ours, theirs = qa_models(arch, len(vocab), device, seed)

        def run_ours():  # from the file, as run_theirs: reading and windowing are timed
            with torch.inference_mode():
                questions, _ = squad.read_squad(path)
                return answers.predict_answers(ours, questions, vocab, windowing, batch_size,
                                               device)

        run_theirs = partial(their_qa_answers, theirs, path, vocab, windowing, batch_size, device)
        # The untimed warm-up round (allocator, thread pools) gives
        # the answers compared: both are deterministic.
        found = {"ours": run_ours(), "theirs": run_theirs()}
        median = interleaved_medians({"ours": (run_ours, 1), "theirs": (run_theirs, 1)},
                                     rounds, device)
    # Same weights, same windows: the answers agree, except where their n-best search
    # never looks at the best span (ours checks every span, so it scores higher), or a
    # near-tie between spans goes the other way.
    agree, n_differ, higher = answer_agreement(found["ours"], found["theirs"])
    ours_qps, theirs_qps = count / median["ours"], count / median["theirs"]
    print(f"qa eval ({count} questions of {what}, batch {batch_size}): ours {ours_qps:.1f} "
          f"questions/s, transformers {theirs_qps:.1f} questions/s; "
          f"same answer for {100 * agree:.1f}%"
          + (f" (of the other {n_differ}, ours found a higher-scoring span beyond their "
             f"20-best for {higher})" if n_differ else ""))
    return ours_qps / theirs_qps


###############################################################################
# The training loop against its bare step
###############################################################################


class LoopTask:
    """What trainer.Trainer asks of a task, with MLM batches made as mlm_task.py makes them
    (data.mlm_batch: <cls> + a window of the token stream, masked with BERT's 80/10/10)
    from an in-memory corpus of random tokens at the bench's vocabulary."""

    best_metric = ("loss", "min")

    def __init__(self, config, batch_size, seed, n_windows):
        self.config, self.batch_size, self.seed = config, batch_size, seed
        specials = list(tokenizer.SPECIALS)
        self.vocab = tokenizer.Vocab(specials + [f"w{i}" for i in
                                                 range(config.vocab_size - len(specials))])
        ids = torch.randint(len(specials), config.vocab_size, (n_windows * (SEQ_LEN - 1),),
                            generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        self.windows = data.mlm_windows(data.TokenizedSplit(ids, torch.tensor([0, len(ids)])),
                                        SEQ_LEN)
        self.masking = data.Masking.of(self.vocab, 0.15, "bert")

    def train_batches(self, epoch):
        order = data.epoch_order(len(self.windows), self.seed, epoch, shuffle=True,
                                 batch_size=self.batch_size)
        make_batch = partial(data.mlm_batch, self.windows, self.vocab.cls_id, self.masking,
                             self.seed, epoch)
        return data.Batches(make_batch, order, self.batch_size)

    @staticmethod
    def loss(model, batch):
        logits = model(batch["inputs"], batch["masked_positions"])
        return F.cross_entropy(logits.float(), batch["targets"])


def batch_build_ms(config, seed, batch_size=64, n=20):
    """Median milliseconds to build one MLM batch of batch_size x SEQ_LEN on the CPU."""
    batches = LoopTask(config, batch_size, seed, batch_size * n).train_batches(1)
    times = []
    for i in range(n):
        start = time.perf_counter()
        batches[i]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_loop(config, batch_size, rounds, steps, device, dtype="fp32", seed=0, compile=False,
               num_workers=0):
    """Tokens/s of the real loop (trainer.Trainer.train_epoch: batches built, moved to the
    device, the step with AdamW, warmup, clipping, the loss and metrics log) and of its
    bare step (Trainer.step on one batch already on the device): (loop, bare). Timed in
    the same epoch, `steps` of each in turn for `rounds` rounds after one of warm-up."""
    task = LoopTask(config, batch_size, seed, batch_size * (steps * (2 * rounds + 2) + 1))
    torch.manual_seed(seed)
    model = MLMTask(config).to(device)
    times = {"loop": [], "bare": []}
    with tempfile.TemporaryDirectory() as folder:
        settings = trainer.TrainConfig(
            lr=1e-4, clip=1.0, epochs=1, batch_size=batch_size, seed=seed, log_interval=10,
            state_file=f"{folder}/state.pt", metrics_file=f"{folder}/metrics.jsonl",
            max_steps=steps * (rounds + 1), num_workers=num_workers, optimizer="adamw",
            schedule="linear", warmup=0.1, weight_decay=0.01, dtype=dtype, compile=compile)
        loop = trainer.Trainer(task, model, settings, distributed.DistInfo(), device,
                               lambda *a: None)
        fixed = utils.to_device(task.train_batches(1)[0], device)
        after_step, mark = loop.after_step, []

        def timed_after_step(window, first_bad_step):
            stop = after_step(window, first_bad_step)
            if loop.state.global_step % steps == 0:  # a round's loop steps are done
                seconds_per_call(lambda: None, 1, device)  # waits for the device
                if mark:
                    times["loop"].append((time.perf_counter() - mark[-1]) / steps)
                times["bare"].append(seconds_per_call(lambda: loop.step([fixed]), steps,
                                                      device))
                mark.append(time.perf_counter())
            return stop

        loop.after_step = timed_after_step
        loop.train_epoch()
    tokens = batch_size * SEQ_LEN
    loop_s, bare_s = statistics.median(times["loop"]), statistics.median(times["bare"][1:])
    print(f"loop: the trainer's loop {tokens / loop_s:.0f} tok/s ({loop_s * 1e3:.1f} ms/step), "
          f"its bare step {tokens / bare_s:.0f} tok/s ({bare_s * 1e3:.1f} ms/step), "
          f"{num_workers} DataLoader workers")
    return tokens / loop_s, tokens / bare_s


###############################################################################
# Main
###############################################################################


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small",
                        help="architecture and batch size (default small)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds: about 75 s on an idle 2-core CPU, several times "
                             "that when other work shares the cores (default off)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda; bf16 autocast for training on GPUs with native "
                             "bf16, else fp32 (default cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training precision of both models: bf16 autocast (CPU or GPU) or "
                             "fp32; auto: bf16 on GPUs with native bf16, else fp32 (default auto). "
                             "QA evaluation is fp32 in every case")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="sequences of 128 tokens per training step (default: the config's)")
    parser.add_argument("--dropout", type=float, default=0.1,
                        help="dropout probability of both models (default 0.1, as in pretraining)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models; compile time is in the warm-up "
                             "(default off)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    parser.add_argument("--squad-file", type=Path,
                        default=SQUAD_FILE if SQUAD_FILE.is_file() else None,
                        help="SQuAD-layout JSON file the QA benchmark reads (default "
                             "squad/train-v1.1-notre-dame.json in $BERT_TEST_DATA, "
                             "one article of 269 questions; synthetic text when that is absent)")
    parser.add_argument("--qa-questions", type=int, default=None,
                        help="questions in the QA benchmark, whole paragraphs, 0 for all "
                             "(default: the config's: all at small, the first 12 or so at base, "
                             "to stay quick)")
    parser.add_argument("--qa-batch-size", type=int, default=None,
                        help="windows per forward in the QA benchmark, both models (default: "
                             "the config's batch size)")
    parser.add_argument("--qa-rounds", type=int, default=None,
                        help="timed QA rounds of ours then theirs (default 2 with --quick, else 5)")
    parser.add_argument("--loop", action="store_true",
                        help="only the training loop against its bare step: trainer.Trainer's "
                             "epoch (batches built, moved, stepped with AdamW and clipping, "
                             "logged) and Trainer.step on a batch already on the device; prints "
                             "loop_ratio (default off)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="--loop: DataLoader worker processes, as the scripts' flag "
                             "(default 0)")
    parser.add_argument("--glue", action="store_true",
                        help="only GLUE fine-tuning and evaluation (bench_glue): ours against "
                             "BertForSequenceClassification fed pairs padded to 128 and with "
                             "dynamic padding, on RTE (glue/RTE in $BERT_TEST_DATA) or synthetic "
                             "SST-2-like text; prints the glue_* ratios (default off)")
    parser.add_argument("--pretrain", action="store_true",
                        help="only the pretraining step of --recipe laptop's shape (bench/"
                             "pretrain.py): tokens/s and GFLOP/s of --size tiny and mini in fp32 "
                             "and bf16 (vocabulary 8192, 64 x 128, 25%% masked) (default off)")
    parser.add_argument("--data", action="store_true",
                        help="only the data-pipeline benchmark: tokenize, numericalize and cache a "
                             "WikiText-103-sized corpus (~540 MB), then load the cache "
                             "(default off)")
    parser.add_argument("--text-file", type=Path, default=TEXT_FILE,
                        help="text that --data repeats into its corpus, WikiText layout (default "
                             "wikitext-2/wiki.valid.tokens in $BERT_TEST_DATA; "
                             "--data stops with an error when it is absent)")
    parser.add_argument("--tokenizer", choices=["basic_english", "wordpiece"],
                        default="basic_english",
                        help="--data: the tokenizer of the pipeline; wordpiece learns a 30522-token "
                             "vocabulary and compares with the tokenizers library alone "
                             "(default basic_english)")
    parser.add_argument("--data-corpus", type=Path, default=Path("/tmp/bert_bench_corpus"),
                        help="where --data builds its corpus (default /tmp/bert_bench_corpus)")
    args = parser.parse_args(argv)
    if args.squad_file is not None and not args.squad_file.is_file():
        parser.error(f"--squad-file {args.squad_file}: no such file")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this PyTorch sees no CUDA device")
    if args.dtype == "bf16":
        try:  # emulated bf16 (V100, T4) would time the emulation
            utils.check_precision(torch.device(args.device), args.dtype)
        except utils.UserError as e:
            parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.data:
        from bertkit.bench import data as bench_data  # the pipeline alone, in its own module

        return bench_data.bench_data(args.text_file, args.data_corpus, args.tokenizer)
    if args.pretrain:
        from bertkit.bench import pretrain

        results = pretrain.bench_pretrain(("tiny", "mini"), ("fp32", "bf16"), args.batch_size
                                          or pretrain.BATCH_SIZE, *((5, 2) if args.quick else
                                                                    (9, 4)), torch.device(args.device))
        return print(pretrain.summary(results))

    spec = CONFIGS[args.config]
    arch = {k: spec[k] for k in ARCH}
    batch_size = args.batch_size or spec["batch_size"]
    rounds, steps = spec["quick"] if args.quick else spec["full"]
    device = torch.device(args.device)
    dtype = training_dtype(device) if args.dtype == "auto" else args.dtype
    config = BertConfig(vocab_size=VOCAB_SIZE, max_len=SEQ_LEN, dropout=args.dropout, **arch)
    print(f"config {args.config}: {arch}, vocab {VOCAB_SIZE}, seq {SEQ_LEN}, batch {batch_size}, "
          f"masked {N_MASKED / SEQ_LEN:.4f}, dropout {args.dropout}, device {device} {dtype}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    t_start = time.perf_counter()
    if args.loop:
        return main_loop(args, spec, config, batch_size, device, dtype, t_start)
    if args.glue:
        return main_glue(args, spec, arch, device, dtype, t_start)

    # The matmul rate is timed in the same rounds as the training steps, so that both see
    # the same machine.
    matmuls = matmul_calls(device, dtype, (batch_size * SEQ_LEN, config.emsize, config.nhid))
    ours_tps, theirs_tps, matmul_seconds = bench_mlm(
        config, batch_size, rounds, steps, device, dtype, args.seed, args.compile,
        also_time={name: fn for name, (_, fn) in matmuls.items()})
    peak = matmul_peak(matmuls, matmul_seconds)
    # Model FLOPs count matmuls only, with the MLM head on the masked positions only.
    model_flops = flops_per_token_train(config, SEQ_LEN, N_MASKED / SEQ_LEN) * ours_tps
    mfu = model_flops / peak
    print(f"mfu: ours {model_flops / 1e9:.1f} GFLOP/s / {peak / 1e9:.1f} = {mfu:.3f}")

    qa_infer_ratio = bench_qa(
        arch, args.qa_batch_size or spec["batch_size"], device, args.squad_file,
        spec["qa_questions"] if args.qa_questions is None else args.qa_questions,
        args.qa_rounds or (2 if args.quick else 5), args.seed)
    print(f"timed in {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print(f"mlm_train_ratio {ours_tps / theirs_tps:.3f} qa_infer_ratio {qa_infer_ratio:.3f} "
          f"mfu {mfu:.3f}")


def main_loop(args, spec, config, batch_size, device, dtype, t_start):
    rounds, steps = spec["loop"][0 if args.quick else 1]
    loop_tps, bare_tps = bench_loop(config, batch_size, rounds, steps, device, dtype, args.seed,
                                    args.compile, args.num_workers)
    build_ms = batch_build_ms(config, args.seed)
    print(f"batch: building one 64x{SEQ_LEN} MLM batch on the CPU takes {build_ms:.2f} ms")
    print(f"timed in {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print(f"loop_ratio {loop_tps / bare_tps:.3f} batch_ms {build_ms:.2f}")


def main_glue(args, spec, arch, device, dtype, t_start):
    from bertkit.bench import glue as bench_glue  # GLUE's pieces, in their own module

    batch_size, quick, full = spec["glue"]
    rounds, steps = quick if args.quick else full
    train, evaluation = bench_glue.bench_glue(arch, args.batch_size or batch_size, rounds, steps,
                                              device, dtype, args.seed, dropout=args.dropout)
    print(f"timed in {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print(bench_glue.summary(train, evaluation))


if __name__ == "__main__":
    main()

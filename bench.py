"""Time our MLM training step against transformers' BertForMaskedLM, side by side.

A short copy of the training step that only measures (as nanoGPT's bench.py):

    python bench.py --config small --quick
    python bench.py --config base --quick

Ours and theirs run in one process on one device with the same architecture, weights,
batch and optimizer, interleaved (ours, theirs, ours, theirs, ...) so that a busy
neighbour or a clock change hits both alike; every number printed is a median. The
last line is machine-readable:

    mlm_train_ratio R qa_infer_ratio Q mfu M

R and Q are throughputs, ours / transformers (> 1: ours is faster); M is the model
FLOP/s of our training step over the matmul FLOP/s this device reaches (see main).
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import corpus
import data
import model
import qa_task
from model import BertConfig, MLMTask, QuestionAnswerTask, flops_per_token_train

VOCAB_SIZE = 28785  # the pretraining recipe's WikiText-103 vocabulary
SEQ_LEN = 128
MASK_FRAC = 0.15
# Architectures compared, and timing as (rounds, training steps per round) for --quick and
# without it; --quick stays under 90 s on a 2-core CPU.
CONFIGS = {
    "small": dict(
        emsize=256, nlayers=4, nhead=4, nhid=1024, batch_size=16, quick=(9, 2), full=(15, 5)
    ),
    "base": dict(
        emsize=768, nlayers=12, nhead=12, nhid=3072, batch_size=8, quick=(3, 1), full=(10, 2)
    ),
}


def ours_to_transformers_state_dict(state_dict):
    """Rename (and split) our parameters into transformers' BERT names.

    Works for the state dict of our BertModel (-> transformers BertModel without pooler),
    MLMTask (-> BertForMaskedLM), NextSentenceTask (-> BertForNextSentencePrediction)
    and QuestionAnswerTask (-> BertForQuestionAnswering). Our fused `in_proj` stacks
    query, key and value along its output dimension, so it is split in three. Our
    `mlm_head` becomes their `cls.predictions.decoder`, and its bias also their second
    copy `cls.predictions.bias` (tied to the decoder's in tied models, unused in untied
    ones). Our mlm_head is not tied to the word embeddings: build their models with
    tie_word_embeddings=False (their_bert_config does).
    """
    encoder = {
        "bert_embed.embed.weight": "embeddings.word_embeddings.weight",
        "bert_embed.pos_embed.pos_embedding.weight": "embeddings.position_embeddings.weight",
        "bert_embed.tok_type_embed.token_type_embeddings.weight": "embeddings.token_type_embeddings.weight",
        "bert_embed.norm.weight": "embeddings.LayerNorm.weight",
        "bert_embed.norm.bias": "embeddings.LayerNorm.bias",
    }
    layer = {
        "self_attn.out_proj": "attention.output.dense",
        "norm1": "attention.output.LayerNorm",
        "linear1": "intermediate.dense",
        "linear2": "output.dense",
        "norm2": "output.LayerNorm",
    }
    heads = {
        "mlm_span": "cls.predictions.transform.dense",
        "norm_layer": "cls.predictions.transform.LayerNorm",
        "mlm_head": "cls.predictions.decoder",
        "linear_layer": "bert.pooler.dense",  # NSP pooler: dense + tanh on position 0
        "ns_span": "cls.seq_relationship",
        "qa_span": "qa_outputs",
    }
    out = {}
    for key, value in state_dict.items():
        # A task model holds the encoder as `bert_model.`; transformers calls it `bert.`.
        prefix, name = (
            ("bert.", key[len("bert_model.") :]) if key.startswith("bert_model.") else ("", key)
        )
        module, _, param = name.rpartition(".")
        if name in encoder:
            out[prefix + encoder[name]] = value
        elif name.startswith("layers."):
            _, index, sub = module.split(".", 2)
            theirs = f"{prefix}encoder.layer.{index}."
            if sub == "self_attn.in_proj":
                for part, chunk in zip(
                    ("query", "key", "value"), value.chunk(3, dim=0), strict=True
                ):
                    out[f"{theirs}attention.self.{part}.{param}"] = chunk
            else:
                out[f"{theirs}{layer[sub]}.{param}"] = value
        elif module in heads:
            out[f"{heads[module]}.{param}"] = value
            if module == "mlm_head" and param == "bias":
                out["cls.predictions.bias"] = value
        else:
            raise KeyError(f"no transformers name for parameter {key}")
    return out


def their_bert_config(config, attn_implementation="sdpa"):
    """transformers.BertConfig of the architecture of our `config`; load our weights into
    their models with ours_to_transformers_state_dict."""
    import transformers  # a dev/test dependency only

    return transformers.BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.emsize,
        num_hidden_layers=config.nlayers,
        num_attention_heads=config.nhead,
        intermediate_size=config.nhid,
        hidden_act="gelu",
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.max_len,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_id,
        tie_word_embeddings=False,  # our mlm_head is a matrix of its own: same parameters
        attn_implementation=attn_implementation,
    )


def mlm_batch(batch_size, seq_len, vocab_size, mask_frac, generator):
    """Random tokens, exactly round(mask_frac * seq_len) masked positions per row (so every
    step does the same work), and transformers' labels: -100 at unmasked positions."""
    src = torch.randint(5, vocab_size, (batch_size, seq_len), generator=generator)  # no pad id
    n_masked = round(mask_frac * seq_len)
    chosen = torch.rand(batch_size, seq_len, generator=generator).argsort(dim=1)[:, :n_masked]
    masked_positions = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    masked_positions.scatter_(1, chosen, True)
    labels = torch.where(masked_positions, src, -100)
    return src, masked_positions, labels


SQUAD_SLICE = Path(__file__).resolve().parent.parent / "shared" / "data" / "squad" / "train-v1.1-notre-dame.json"


def squad_for_bench(folder, n_questions):
    """The real SQuAD article when present (else synthetic text, said so), cut to about
    n_questions questions (whole paragraphs), written as a SQuAD-layout JSON file."""
    if SQUAD_SLICE.exists():
        source, what = json.loads(SQUAD_SLICE.read_text(encoding="utf-8")), "the real SQuAD article"
    else:
        g = random.Random(0)
        words = [f"w{i}" for i in range(3000)]
        paragraphs = []
        for p in range(60):
            context = " ".join(g.choice(words) for _ in range(140)) + "."
            qas = [{"id": f"{p}-{i}", "question": " ".join(g.choice(words) for _ in range(10)) + "?",
                    "answers": [{"text": context[:20].rsplit(" ", 1)[0], "answer_start": 0}]}
                   for i in range(5)]
            paragraphs.append({"context": context, "qas": qas})
        source, what = {"data": [{"title": "synthetic", "paragraphs": paragraphs}]}, "synthetic text (../shared/data/squad absent)"
    kept, count = [], 0
    for paragraph in source["data"][0]["paragraphs"]:
        if n_questions and count >= n_questions:
            break
        kept.append(paragraph)
        count += len(paragraph["qas"])
    path = Path(folder) / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "bench", "paragraphs": kept}]}), encoding="utf-8")
    return path, what, count


def their_qa_answers(model, path, vocab, windowing, batch_size, n_best=20):
    """transformers' way, as its run_qa.py example does it: every window padded to --bptt,
    one forward of BertForQuestionAnswering per batch, then its post-processing: the
    n_best start and end candidates of each window, checked one pair at a time."""
    import numpy as np

    questions, _ = qa_task.read_squad(path)
    windows = qa_task.make_windows(questions, vocab, windowing)
    best = {}  # question index -> (score, first context token, last context token)
    position = torch.arange(windows.tokens.size(1))
    with torch.inference_mode():
        for indices in torch.arange(len(windows)).split(batch_size):
            ids = windows.tokens[indices].long()
            lengths, offsets = windows.lengths[indices, None], windows.context_offset[indices, None]
            out = model(input_ids=ids, attention_mask=(position < lengths).long(),
                        token_type_ids=((position >= offsets) & (position < lengths)).long())
            starts, ends = out.start_logits.numpy(), out.end_logits.numpy()
            for row, window in enumerate(indices.tolist()):
                offset, length = int(offsets[row]), int(lengths[row])
                question = int(windows.question[window])
                to_context = int(windows.context_start[window]) - offset
                for s in np.argsort(starts[row])[-1:-n_best - 1:-1].tolist():
                    for e in np.argsort(ends[row])[-1:-n_best - 1:-1].tolist():
                        if s < offset or e < offset or s >= length - 1 or e >= length - 1:
                            continue  # outside the context
                        if e < s or e - s + 1 > windowing.max_answer_len:
                            continue
                        score = float(starts[row][s] + ends[row][e])
                        if question not in best or score > best[question][0]:
                            best[question] = (score, s + to_context, e + to_context)
    answers = {}
    for question, (score, first, last) in best.items():
        q, spans = windows.questions[question], windows.context_spans[question]
        answers[q.qid] = (q.context[spans[first][0]:spans[last][1]], score)
    return answers


def bench_qa(config, device, args):
    """QA evaluation throughput in questions/s, raw SQuAD JSON to answer strings, fp32,
    same weights: ours (qa_task's evaluation path) / transformers (BertForQuestionAnswering
    fed windows padded to --bptt, with its examples' post-processing). Both read and window
    the JSON the same way (the last window of a long context holds what is left of it, as
    in BERT and transformers' examples, so it is often short): the difference is the model
    call (ours: windows sorted by length, each batch cut to its longest window, oneDNN
    kernels) and the decoding."""
    n_questions = args.qa_questions if args.qa_questions is not None else (12 if config["emsize"] >= 768 else 0)
    # Windows per forward: the config's batch unless given. At base the 15 questions make
    # only 40 windows; in batches of 32 there would be nothing to sort them into.
    batch_size = args.qa_batch_size or config["batch_size"]
    with tempfile.TemporaryDirectory() as folder:
        path, what, count = squad_for_bench(folder, n_questions)
        questions, _ = qa_task.read_squad(path)
        words = Counter(t for q in questions for t in data.basic_english_normalize(q.context + " " + q.text))
        vocab = data.Vocab.build(words)
        vocab = data.Vocab(vocab.itos + [f"<filler{i}>" for i in range(VOCAB_SIZE - len(vocab))])
        qa_config = BertConfig(vocab_size=VOCAB_SIZE, emsize=config["emsize"], nhead=config["nhead"],
                               nhid=config["nhid"], nlayers=config["nlayers"], dropout=0.0,
                               qa_gelu=False, pad_id=data.PAD_ID)
        torch.manual_seed(args.seed)
        ours = QuestionAnswerTask(qa_config).to(device).eval()
        import transformers

        theirs = transformers.BertForQuestionAnswering(their_bert_config(qa_config))
        theirs.load_state_dict(ours_to_transformers_state_dict(ours.state_dict()))
        theirs.to(device).eval()
        windowing = qa_task.Windowing()

        def run_ours():
            with torch.inference_mode():
                qs, _ = qa_task.read_squad(path)
                return qa_task.predict_answers(ours, qs, vocab, windowing, batch_size, device)

        def run_theirs():
            return their_qa_answers(theirs, path, vocab, windowing, batch_size)

        times, answers = {"ours": [], "theirs": []}, {}
        # One untimed warm-up round (allocator, thread pools, oneDNN's kernel cache).
        for round_ in range(1 + (args.qa_rounds or (2 if args.quick else 5))):
            for name, fn in (("ours", run_ours), ("theirs", run_theirs)):
                start = time.perf_counter()
                answers[name] = fn()
                if round_:
                    times[name].append(time.perf_counter() - start)
        # Same weights, same windows: the answers agree, except where their n-best search
        # never looks at the best span (ours checks every span, so it scores higher), or a
        # near-tie between spans goes the other way (equal scores to 1e-4).
        a, b = answers["ours"], answers["theirs"]
        differ = [q for q in a if a[q][0] != b.get(q, ("",))[0]]
        agree = 1 - len(differ) / len(a)
        higher = sum(q not in b or a[q][1] > b[q][1] + 1e-4 for q in differ)
    ours_qps, theirs_qps = (count / statistics.median(times[n]) for n in ("ours", "theirs"))
    print(f"qa eval ({count} questions of {what}, batch {batch_size}): ours {ours_qps:.1f} "
          f"questions/s, transformers {theirs_qps:.1f} questions/s; same answer for {100 * agree:.1f}%"
          + (f" (of the other {len(differ)}, ours found a higher-scoring span beyond their "
             f"20-best for {higher})" if differ else ""))
    return ours_qps / theirs_qps


WIKITEXT2_VALID = Path(__file__).resolve().parent.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"


def bench_data(args):
    """Tokenize, numericalize and cache a WikiText-103-sized corpus, then load the cache.

    The corpus is the real WikiText-2 validation split repeated into ~540 MB of text
    (`--data-corpus`, built once) laid out as WikiText-103. Run alone (python bench.py
    --data) so that the peak resident memory measured is the pipeline's: this process's
    plus the tokenizer workers' (an upper bound: the largest worker's peak times their number).
    """
    if not WIKITEXT2_VALID.exists():
        sys.exit(f"error: --data needs {WIKITEXT2_VALID} (the real WikiText-2 validation split)")
    folder = Path(args.data_corpus) / "wikitext-103"
    text = WIKITEXT2_VALID.read_bytes()
    repeats = 480  # 480 x 1.12 MB: WikiText-103's size, ~103M tokens
    train = folder / "wiki.train.tokens"
    if not (train.exists() and train.stat().st_size == len(text) * repeats):
        folder.mkdir(parents=True, exist_ok=True)
        with open(train, "wb") as f:
            for _ in range(repeats):
                f.write(text)
        lines = text.decode("utf-8").splitlines(keepends=True)
        (folder / "wiki.valid.tokens").write_text("".join(lines[:700]), encoding="utf-8")
        (folder / "wiki.test.tokens").write_text("".join(lines[-700:]), encoding="utf-8")
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    vocab_path = Path(args.data_corpus) / "bench_vocab.pt"
    vocab_path.unlink(missing_ok=True)
    quiet = lambda *_: None  # noqa: E731

    start = time.perf_counter()
    vocab, splits = corpus.load_splits("WikiText103", args.data_corpus, vocab_path=vocab_path, log=quiet)
    tokenize_s = time.perf_counter() - start
    n_tokens = sum(len(s.ids) for s in splits.values())
    del splits
    start = time.perf_counter()
    _, cached = corpus.load_splits("WikiText103", args.data_corpus, vocab_path=vocab_path, log=quiet)
    load_s = time.perf_counter() - start
    assert sum(len(s.ids) for s in cached.values()) == n_tokens

    workers = corpus.default_workers()
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peak_mb = main_mb + workers * worker_mb
    print(f"data: {train.stat().st_size / 1e6:.0f} MB of text, {n_tokens / 1e6:.1f}M tokens, vocab "
          f"{len(vocab)}, {workers} worker processes")
    print(f"data: vocab + token ids + cache {tokenize_s:.1f} s; peak resident {main_mb:.0f} MB + "
          f"{workers} x {worker_mb:.0f} MB = {peak_mb:.0f} MB; cache load {load_s:.2f} s")
    print(f"data_tokenize_s {tokenize_s:.1f} data_peak_rss_mb {peak_mb:.0f} data_cache_load_s {load_s:.2f}")


def main():

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        choices=sorted(CONFIGS),
        default="small",
        help="architecture and batch size (default small)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer rounds: under 90 s on a 2-core CPU (default off)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default cuda when available)",
    )
    parser.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="sequences of 128 tokens per step (default: the config's)",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="dropout probability of both models (default 0.1, as in pretraining)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile both models; compile time is in the warm-up (default off)",
    )
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    parser.add_argument("--qa-questions", type=int, default=None,
                        help="SQuAD questions in the QA benchmark, whole paragraphs (default: all "
                             "269 of the article; the first 12 or so at --config base, to stay quick)")
    parser.add_argument("--qa-batch-size", type=int, default=None,
                        help="windows per forward in the QA benchmark, both models (default: "
                             "the config's batch size)")
    parser.add_argument("--qa-rounds", type=int, default=None,
                        help="timed QA rounds of ours then theirs (default 2 with --quick, else 5)")
    parser.add_argument("--data", action="store_true",
                        help="only the data-pipeline benchmark: tokenize, numericalize and cache a "
                             "WikiText-103-sized corpus (~540 MB), then load the cache")
    parser.add_argument("--data-corpus", default="/tmp/bert_bench_corpus",
                        help="where --data builds its corpus (default /tmp/bert_bench_corpus)")
    args = parser.parse_args()
    if args.data:
        return bench_data(args)

    spec = CONFIGS[args.config]
    arch = {k: spec[k] for k in ("emsize", "nlayers", "nhead", "nhid")}
    batch_size = args.batch_size or spec["batch_size"]
    rounds, steps = spec["quick"] if args.quick else spec["full"]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    # bf16 autocast on GPUs that have it (PyTorch's AMP recipe: autocast the forward and
    # the loss only); plain fp32 on CPU, the precision the targets are set in.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext()

    # Same dropout probability and placement in both (ours draws its CPU masks faster).
    import transformers  # a dev/test dependency only

    config = BertConfig(vocab_size=VOCAB_SIZE, max_len=SEQ_LEN, dropout=args.dropout, **arch)
    ours = MLMTask(config)
    theirs = transformers.BertForMaskedLM(their_bert_config(config))
    theirs.load_state_dict(ours_to_transformers_state_dict(ours.state_dict()))
    ours.to(device).train()
    theirs.to(device).train()
    # The recipe's optimizer (utils.Trainer): plain SGD. foreach=True and fused=True
    # measured no faster on CPU (the step is ~1% of ours and memory bound).
    ours_opt = torch.optim.SGD(ours.parameters(), lr=1e-4)
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=1e-4)
    ours_fwd = torch.compile(ours) if args.compile else ours
    theirs_fwd = torch.compile(theirs) if args.compile else theirs

    src, masked_positions, labels = mlm_batch(
        batch_size, SEQ_LEN, VOCAB_SIZE, MASK_FRAC, torch.Generator().manual_seed(args.seed)
    )
    src, masked_positions, labels = src.to(device), masked_positions.to(device), labels.to(device)
    targets = src[masked_positions]
    mask_frac = masked_positions.float().mean().item()

    def ours_step():
        with autocast:
            # As mlm_task.py: an unpadded batch, so no attention mask.
            logits = ours_fwd(src, masked_positions, attn_mask=None)
            loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def theirs_step():
        # As users run it: logits at every position, the loss ignores label -100.
        with autocast:
            loss = theirs_fwd(input_ids=src, labels=labels).loss
        loss.backward()
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)

    # This device's matmul FLOP/s, measured in the same rounds as the models so both see
    # the same machine: a large square product, and the model's own largest encoder
    # product, (batch*seq, emsize) @ (emsize, nhid); each with PyTorch's matmul and, on
    # the CPU, with oneDNN's (which our linear layers use). The fastest is MFU's denominator.
    n = 2048 if device.type == "cpu" else 8192
    mm_shapes = {"square": (n, n, n), "ffn": (batch_size * SEQ_LEN, config.emsize, config.nhid)}
    mm_operands = {
        name: (torch.randn(rows, inner, device=device), torch.randn(inner, cols, device=device))
        for name, (rows, inner, cols) in mm_shapes.items()
    }
    mm_kernels = {f"{name} torch.mm": (name, torch.mm) for name in mm_shapes}
    if device.type == "cpu" and model.ONEDNN_AVAILABLE:  # even with BERT_ONEDNN=0
        mm_kernels.update({f"{name} oneDNN": (name, lambda a, b: model._onednn_linear(a, b.t()))
                           for name in mm_shapes})

    def matmul(kernel):
        name, fn = mm_kernels[kernel]
        with autocast:
            fn(*mm_operands[name])

    def seconds_per_call(fn, calls):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls

    print(
        f"config {args.config}: {arch}, vocab {VOCAB_SIZE}, seq {SEQ_LEN}, batch {batch_size}, "
        f"masked {mask_frac:.4f}, dropout {args.dropout}, device {device}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    t_start = time.perf_counter()
    for step in (ours_step, theirs_step):  # warm-up: allocator, compilation
        seconds_per_call(step, 1)
    times = {"ours": [], "theirs": [], **{kernel: [] for kernel in mm_kernels}}
    for _ in range(rounds):
        times["ours"].append(seconds_per_call(ours_step, steps))
        times["theirs"].append(seconds_per_call(theirs_step, steps))
        for kernel in mm_kernels:
            times[kernel].append(seconds_per_call(lambda kernel=kernel: matmul(kernel), 3))
    median = {name: statistics.median(t) for name, t in times.items()}

    tokens = batch_size * SEQ_LEN
    ours_tps, theirs_tps = tokens / median["ours"], tokens / median["theirs"]
    mlm_train_ratio = ours_tps / theirs_tps
    print(
        f"mlm train: ours {ours_tps:.0f} tok/s ({median['ours'] * 1e3:.0f} ms/step), "
        f"transformers {theirs_tps:.0f} tok/s ({median['theirs'] * 1e3:.0f} ms/step), "
        f"ratio {mlm_train_ratio:.2f}"
    )
    mm_flops = {kernel: 2 * math.prod(mm_shapes[name]) / median[kernel]
                for kernel, (name, _) in mm_kernels.items()}
    print("matmul: " + ", ".join(
        f"{kernel} {'x'.join(map(str, mm_shapes[name]))} {mm_flops[kernel] / 1e9:.1f} GFLOP/s"
        for kernel, (name, _) in mm_kernels.items()))
    # Model FLOPs count matmuls only, with the MLM head on the masked positions only.
    model_flops = flops_per_token_train(config, SEQ_LEN, mask_frac) * ours_tps
    mfu = model_flops / max(mm_flops.values())
    print(
        f"mfu: ours {model_flops / 1e9:.1f} GFLOP/s / {max(mm_flops.values()) / 1e9:.1f} = {mfu:.3f}"
    )

    qa_infer_ratio = bench_qa({**arch, "batch_size": spec["batch_size"]}, device, args)
    print(f"timed in {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print(
        f"mlm_train_ratio {mlm_train_ratio:.3f} qa_infer_ratio {qa_infer_ratio:.3f} mfu {mfu:.3f}"
    )


if __name__ == "__main__":
    main()

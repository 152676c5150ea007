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
import math
import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from model import BertConfig, MLMTask, flops_per_token_train

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
        emsize=768, nlayers=12, nhead=12, nhid=3072, batch_size=8, quick=(6, 1), full=(10, 2)
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


def bench_qa(config, device, autocast, args):
    """HOOK: QA evaluation throughput, our QuestionAnswerTask vs BertForQuestionAnswering.

    Returns ours / transformers (examples per second), nan until this is wired to qa_task.py.
    """
    try:
        import qa_task  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "qa_task":
            raise
        print("qa: not yet available (qa_task.py missing)")
        return math.nan
    print("qa: not yet available (qa_task.py is there, not yet wired into bench.py)")
    return math.nan


def main():
    import transformers  # a dev/test dependency only

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
    args = parser.parse_args()

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

    # Same dropout probability in both, but ours also drops the feed-forward activations
    # (nn.TransformerEncoderLayer's placement; BERT and transformers do not), which costs
    # ours ~7% at --config small. With --dropout 0 both compute the same function.
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
    # product, (batch*seq, emsize) @ (emsize, nhid). The faster is MFU's denominator.
    n = 2048 if device.type == "cpu" else 8192
    mm_shapes = {"square": (n, n, n), "ffn": (batch_size * SEQ_LEN, config.emsize, config.nhid)}
    mm_operands = {
        name: (torch.randn(rows, inner, device=device), torch.randn(inner, cols, device=device))
        for name, (rows, inner, cols) in mm_shapes.items()
    }

    def matmul(name):
        with autocast:
            torch.mm(*mm_operands[name])

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
    times = {"ours": [], "theirs": [], **{name: [] for name in mm_shapes}}
    for _ in range(rounds):
        times["ours"].append(seconds_per_call(ours_step, steps))
        times["theirs"].append(seconds_per_call(theirs_step, steps))
        for name in mm_shapes:
            times[name].append(seconds_per_call(lambda name=name: matmul(name), 3))
    median = {name: statistics.median(t) for name, t in times.items()}

    tokens = batch_size * SEQ_LEN
    ours_tps, theirs_tps = tokens / median["ours"], tokens / median["theirs"]
    mlm_train_ratio = ours_tps / theirs_tps
    print(
        f"mlm train: ours {ours_tps:.0f} tok/s ({median['ours'] * 1e3:.0f} ms/step), "
        f"transformers {theirs_tps:.0f} tok/s ({median['theirs'] * 1e3:.0f} ms/step), "
        f"ratio {mlm_train_ratio:.2f}"
    )
    mm_flops = {name: 2 * math.prod(shape) / median[name] for name, shape in mm_shapes.items()}
    print(
        "matmul: "
        + ", ".join(
            f"{name} {'x'.join(map(str, shape))} {mm_flops[name] / 1e9:.1f} GFLOP/s"
            for name, shape in mm_shapes.items()
        )
    )
    # Model FLOPs count matmuls only, with the MLM head on the masked positions only.
    model_flops = flops_per_token_train(config, SEQ_LEN, mask_frac) * ours_tps
    mfu = model_flops / max(mm_flops.values())
    print(
        f"mfu: ours {model_flops / 1e9:.1f} GFLOP/s / {max(mm_flops.values()) / 1e9:.1f} = {mfu:.3f}"
    )

    qa_infer_ratio = bench_qa(config, device, autocast, args)
    print(f"timed in {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    print(
        f"mlm_train_ratio {mlm_train_ratio:.3f} qa_infer_ratio {qa_infer_ratio:.3f} mfu {mfu:.3f}"
    )


if __name__ == "__main__":
    main()

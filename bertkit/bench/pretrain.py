"""The pretraining step's throughput at the small sizes (bench.py --pretrain): training
tokens/s and model FLOP/s of one MLM step of --recipe laptop's shape (--size tiny and mini,
sequences of 128 tokens, a vocabulary of 8,192, 64 sequences, 25% masked, AdamW, clipping),
in fp32 and in bf16 autocast, every configuration timed in turn within each round (a busy
neighbour hits each alike); the numbers are medians.

The last line is machine-readable: `pretrain_tokens_per_s` then `SIZE_DTYPE TOKENS_PER_S`
for each, and `pretrain_gflops` the same for the model's GFLOP/s.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

import utils
from bertkit.bench.timing import interleaved_medians, seconds_per_call
from bertkit.presets import SIZES
from bertkit.training.optimizer import make_optimizer
from model import BertConfig, MLMTask, flops_per_token_train

SEQ_LEN, VOCAB_SIZE, BATCH_SIZE, MASK_FRAC = 128, 8192, 64, 0.25
OPTIMIZER = SimpleNamespace(optimizer="adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98),
                            eps=1e-6)


def size_config(size, vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN):
    layers, hidden = SIZES[size]
    return BertConfig(vocab_size=vocab_size, emsize=hidden, nlayers=layers, nhead=hidden // 64,
                      nhid=4 * hidden, dropout=0.0, max_len=seq_len)


def mlm_step(config, batch_size, device, dtype, seed=0, seq_len=SEQ_LEN, mask_frac=MASK_FRAC):
    """One training step as the Trainer takes it (autocast forward and loss, backward,
    gradient norm clipped, AdamW), on a fixed batch of random tokens with the same number
    of masked positions in every row; a function of no arguments."""
    torch.manual_seed(seed)
    model = MLMTask(config).to(device).train()
    optimizer = make_optimizer(model, OPTIMIZER, device)
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=g)
    n_masked = max(1, round(mask_frac * seq_len))
    positions = torch.rand(batch_size, seq_len, generator=g).topk(n_masked, dim=1).indices
    positions = positions.sort(dim=1).values
    targets = inputs.gather(1, positions).flatten()
    inputs, positions, targets = (t.to(device) for t in (inputs, positions, targets))

    def step():
        with utils.autocast(device, dtype):
            logits = model(inputs, positions)
        loss = F.cross_entropy(logits.float(), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_pretrain(sizes, dtypes, batch_size, rounds, steps, device, seed=0, vocab_size=VOCAB_SIZE,
                   seq_len=SEQ_LEN):
    """{(size, dtype): (tokens/s, model FLOP/s)} of mlm_step, printed as a table."""
    configs = {(size, dtype): size_config(size, vocab_size, seq_len)
               for size in sizes for dtype in dtypes}
    calls = {key: (mlm_step(config, batch_size, device, key[1], seed, seq_len), steps)
             for key, config in configs.items()}
    for fn, _ in calls.values():  # warm-up: allocator, fused kernels, thread pools
        seconds_per_call(fn, 1, device)
    median = interleaved_medians(calls, rounds, device)
    tokens = batch_size * seq_len
    results = {}
    for key, seconds in median.items():
        flops = flops_per_token_train(configs[key], seq_len, MASK_FRAC) * tokens / seconds
        results[key] = (tokens / seconds, flops)
        layers, hidden = SIZES[key[0]]
        print(f"pretrain {key[0]:>6} ({layers}/{hidden}) {key[1]}: {tokens / seconds:9.0f} "
              f"tokens/s, {seconds * 1e3:7.1f} ms/step, {flops / 1e9:7.1f} GFLOP/s")
    return results


def summary(results):
    names = {key: f"{key[0]}_{key[1]}" for key in results}
    return (" ".join(["pretrain_tokens_per_s"] + [f"{names[k]} {v[0]:.0f}" for k, v in results.items()])
            + " " + " ".join(["pretrain_gflops"] + [f"{names[k]} {v[1] / 1e9:.1f}"
                                                    for k, v in results.items()]))

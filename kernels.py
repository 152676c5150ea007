"""CPU kernels behind model.py's layers: the seam between the readable model and speed.

model.py builds its layers with `Dropout` and `attention` below. Each is the plain
PyTorch operation everywhere except in CPU training, where a measured faster kernel
computes the same math (tests/test_kernels.py checks each against the plain one):

- `Dropout` draws its keep mask with `torch.rand` instead of `bernoulli_`.
- `attention` writes out softmax(q k^T) v when it has to apply dropout.

GPUs keep PyTorch's fused kernels.
"""

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x, p, training):
    """F.dropout, with the keep mask drawn on the CPU as `uniform >= p`.

    Same distribution (keep with probability 1 - p, scale kept values by 1 / (1 - p)),
    different random stream: CPU `torch.rand` is about twice as fast as the `bernoulli_`
    behind F.dropout, whose masks took ~10% of a BERT-base training step on the CPU.
    GPUs keep F.dropout's fused kernel."""
    if not training or not 0.0 < p < 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * torch.rand_like(x).ge_(p).div_(1.0 - p)


class Dropout(nn.Dropout):
    def forward(self, x):
        return dropout(x, self.p, self.training)


def attention(q, k, v, attn_mask, dropout_p):
    """softmax(q k^T / sqrt(head_dim)) v over (batch, nhead, seq, head_dim) tensors, with
    dropout on the attention probabilities; `attn_mask` is True where a key is attended.

    PyTorch's fused SDPA kernels everywhere but in CPU training with dropout: SDPA's
    fused CPU kernel has no dropout, and its fallback takes extra passes (safe softmax,
    scaling both q and k); this one, with `dropout` above, spends ~20% less time."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return dropout(torch.softmax(scores, dim=-1), dropout_p, True) @ v

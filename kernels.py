"""CPU kernels behind model.py's layers: the seam between the readable model and speed.

model.py builds its layers from `Linear`, `Dropout` and `attention` below. Each is the
plain PyTorch operation everywhere except on the CPU, where a measured faster kernel
computes the same math (tests/test_kernels.py checks each against the plain one):

- `Linear` runs inference in fp32 on oneDNN's matmul, on x86-64 CPUs only.
- `Dropout` draws its keep mask with `torch.rand` instead of `bernoulli_`.
- `attention` writes out softmax(q k^T) v when it has to apply dropout.

BERT_ONEDNN=0 in the environment turns the oneDNN matmul off, to compare. GPUs, autocast
and torch.compile always take the plain PyTorch path.
"""

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_AVAILABLE = (torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
# Measured on x86-64 only; ARM laptops have a faster BLAS of their own.
ONEDNN = (ONEDNN_AVAILABLE and platform.machine().lower() in ("x86_64", "amd64")
          and os.environ.get("BERT_ONEDNN", "1") != "0")


def onednn_linear(x, weight, bias=None):
    """x @ weight.T + bias in one oneDNN call (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint keys) whose inference runs on oneDNN's
    fp32 matmul on x86-64 CPUs: 10-20% faster than PyTorch's default there on this
    model's shapes (bench.py's QA ratio). Training keeps F.linear: a oneDNN training path
    measured no faster on an AMD EPYC and slower on an Intel Xeon."""

    def forward(self, x):
        if (ONEDNN and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


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

"""CPU kernels behind model.py's layers: the seam between the readable model and speed.

model.py builds its layers with `Dropout` and `attention` below. Each is the plain
PyTorch operation everywhere except in CPU training, where a measured faster kernel
computes the same math (tests/test_kernels.py checks each against the plain one):

- `Dropout` draws its keep mask with `torch.rand` instead of `bernoulli_`.
- `attention` writes out softmax(q k^T) v when it has to apply dropout.
- `packing` lets a classifier's encoder skip the padding of its batch: the per-token layers
  (linear, LayerNorm, dropout, feed-forward) run on the real tokens alone, packed
  (n_tokens, features), and attention repads them (MosaicBERT's and Cramming's
  "unpadding").

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
    scaling both q and k); this one, with `dropout` above, spends ~20% less time. The
    scaling and the padding's -inf are folded into the first product (baddbmm: 15-25%
    faster again than a separate multiply and masked_fill, measured at 32 x 4 heads x 128)."""
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    batch, nhead, seq_q, head_dim = q.shape
    seq_k = k.size(-2)
    if attn_mask is None:
        bias = q.new_zeros(1, 1, 1)
    else:  # 0 where a key is attended, -inf at the padding, for every head
        bias = q.new_zeros(attn_mask.shape).masked_fill_(~attn_mask, float("-inf"))
        bias = bias.expand(batch, nhead, 1, seq_k).reshape(batch * nhead, 1, seq_k)
    scores = torch.baddbmm(bias, q.reshape(-1, seq_q, head_dim),
                           k.reshape(-1, seq_k, head_dim).transpose(1, 2), alpha=head_dim ** -0.5)
    probabilities = dropout(torch.softmax(scores, dim=-1), dropout_p, True)
    return torch.bmm(probabilities, v.reshape(-1, seq_k, head_dim)).view(q.shape)


class Packing:
    """The real tokens of a padded (batch, seq) batch, packed end to end into
    (n_tokens, features), and their way back for attention, which needs each row's tokens
    side by side."""

    def __init__(self, padding_mask):
        self.shape = padding_mask.shape
        self.attn_mask = padding_mask[:, None, None, :]
        self.index = padding_mask.flatten().nonzero().squeeze(1)
        lengths = padding_mask.sum(1)
        self.starts = lengths.cumsum(0) - lengths  # of each row's tokens in the pack

    def first_tokens(self, x):
        """(n_tokens, features) -> (batch, features): each row's first token (<cls>)."""
        return x.index_select(0, self.starts)

    def pack(self, x):
        """(batch, seq, features) -> (n_tokens, features)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x):
        """(n_tokens, features) -> (batch, seq, features), zeros at the padding."""
        padded = x.new_zeros(self.shape.numel(), x.size(-1)).index_copy(0, self.index, x)
        return padded.view(*self.shape, x.size(-1))


def packing(padding_mask, device):
    """A Packing of a CPU batch with padding in every row but its first token; None (keep
    the padded layout) without padding or on a GPU, where finding the tokens (nonzero)
    would wait for the device's queue and break compiled graphs."""
    if padding_mask is None or device.type != "cpu" or bool(padding_mask.all()):
        return None
    return Packing(padding_mask)

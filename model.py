"""BERT encoder and its three task heads (masked LM, next sentence, question answering).

Only nn.Modules and their config live here: no I/O, no argument parsing.
Every tensor is (batch, seq[, feature]).
"""

import os
import platform
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BertConfig:
    """Everything needed to rebuild the architecture; stored in every checkpoint."""

    vocab_size: int
    emsize: int = 768  # hidden size
    nhead: int = 12
    nhid: int = 3072  # feed-forward size
    nlayers: int = 12
    dropout: float = 0.5
    max_len: int = 512  # number of learned positions
    type_vocab_size: int = 2
    pad_id: int = 1
    layer_norm_eps: float = 1e-12
    # The old example applied a GELU to the encoder output before the QA projection;
    # transformers' BertForQuestionAnswering does not. Kept as the default for continuity.
    qa_gelu: bool = True

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**d)


def fast_dropout(x, p, training):
    """F.dropout, with the keep mask drawn on CPU as `uniform >= p`.

    Same distribution (keep with probability 1 - p, scale kept values by 1 / (1 - p)),
    different random stream: CPU `torch.rand` is about twice as fast as the `bernoulli_`
    behind F.dropout, whose masks took ~10% of a BERT-base training step on CPU.
    GPUs keep F.dropout's fused kernel.
    """
    if not training or not 0.0 < p < 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * torch.rand_like(x).ge_(p).div_(1.0 - p)


class Dropout(nn.Dropout):
    def forward(self, x):
        return fast_dropout(x, self.p, self.training)


# oneDNN's matmul for the linear layers (see `linear`): on x86-64 CPUs, where it was
# measured; elsewhere (ARM laptops have faster BLAS) PyTorch's default. BERT_ONEDNN=0 in
# the environment turns it off, to compare.
ONEDNN_AVAILABLE = (torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
ONEDNN = (ONEDNN_AVAILABLE and platform.machine().lower() in ("x86_64", "amd64")
          and os.environ.get("BERT_ONEDNN", "1") != "0")


def _use_onednn(x, weight):
    """True where `linear` takes oneDNN's matmul: fp32 on the CPU, with no autocast to
    obey (autocast casts F.linear, not these calls), outside torch.compile (which picks
    its own kernels)."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _onednn_linear(x, weight, bias=None, post_op="none"):
    """x @ weight.T + bias, then GELU if post_op == "gelu", in one oneDNN call (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(
        x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


class OneDNNLinear(torch.autograd.Function):
    """F.linear for fp32 training on the CPU: the forward product and the input gradient
    on oneDNN's matmul, the weight gradient on PyTorch's (MKL's), whichever measured
    faster for each (tests check the gradients against F.linear's)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t())
        grad = grad.reshape(-1, grad.size(-1))
        if ctx.needs_input_grad[1]:
            grad_weight = grad.t() @ x.reshape(-1, x.size(-1))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x, layer, gelu=False, residual=None, dropout=None):
    """`residual + dropout(gelu?(layer(x)))`, each part optional: every linear layer of
    the encoder and the MLM head, written once for training and inference.

    On the CPU in fp32 the product runs on oneDNN's matmul, which measured 10-15%
    faster than PyTorch's default (MKL) on this project's matmul shapes. In inference
    (no gradient to record) the bias, the GELU or the residual add are applied by that
    same call to each output tile while it is still in cache (oneDNN "post-ops"),
    instead of in separate passes over memory. The math is the same in fp32 up to the
    order of the sums (~1e-6). Elsewhere (GPUs, autocast, torch.compile) this is F.linear.
    """
    no_dropout = dropout is None or not dropout.training or dropout.p == 0.0
    if _use_onednn(x, layer.weight):
        if not torch.is_grad_enabled() and no_dropout:
            if residual is not None and not gelu:
                return torch.ops.mkldnn._linear_pointwise.binary(
                    x, residual, layer.weight, layer.bias, "add")
            y = _onednn_linear(x, layer.weight, layer.bias, "gelu" if gelu else "none")
            return y if residual is None else residual + y
        y = OneDNNLinear.apply(x, layer.weight, layer.bias)
    else:
        y = F.linear(x, layer.weight, layer.bias)
    if gelu:
        y = F.gelu(y)
    if not no_dropout:
        y = dropout(y)
    return y if residual is None else residual + y


class PositionalEncoding(nn.Module):
    """Learned absolute positions, as in BERT (not the sinusoidal encoding)."""

    def __init__(self, d_model, max_len=512):
        super().__init__()
        self.pos_embedding = nn.Embedding(max_len, d_model)

    def forward(self, src):
        seq_len = src.size(1)
        if seq_len > self.pos_embedding.num_embeddings:
            raise ValueError(
                f"sequence of {seq_len} tokens is longer than the model's "
                f"{self.pos_embedding.num_embeddings} positions"
            )
        positions = torch.arange(seq_len, device=src.device)
        return self.pos_embedding(positions).unsqueeze(0)  # (1, seq, d_model)


class TokenTypeEncoding(nn.Module):
    def __init__(self, type_token_num, d_model):
        super().__init__()
        self.token_type_embeddings = nn.Embedding(type_token_num, d_model)

    def forward(self, src, token_type_input=None):
        if token_type_input is None:
            # Type 0 everywhere: one row of the table broadcast, no index tensor needed.
            return self.token_type_embeddings.weight[0]
        return self.token_type_embeddings(token_type_input)


class BertEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.emsize)
        self.pos_embed = PositionalEncoding(config.emsize, config.max_len)
        self.tok_type_embed = TokenTypeEncoding(config.type_vocab_size, config.emsize)
        self.norm = nn.LayerNorm(config.emsize, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, src, token_type_input=None):
        x = self.embed(src) + self.pos_embed(src) + self.tok_type_embed(src, token_type_input)
        return self.dropout(self.norm(x))


class MultiheadAttention(nn.Module):
    """Self-attention with one fused q/k/v projection and PyTorch's fused SDPA kernels.

    `in_proj` holds the query, key and value projections stacked along the output
    dimension (rows [0:d] = query, [d:2d] = key, [2d:3d] = value): one matmul instead
    of three. `attn_mask` is a boolean (batch, 1, 1, seq) tensor, True where a key may
    be attended, or None when nothing is padded (which lets SDPA pick its fastest kernel).
    Training with dropout on CPU takes `attention_with_dropout_cpu` instead of SDPA.
    """

    def __init__(self, d_model, nhead, dropout=0.0):
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"emsize {d_model} is not divisible by nhead {nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, attn_mask=None, residual=None, dropout=None):
        """`residual + dropout(attention(x))`, the residual and dropout optional (see linear)."""
        batch, seq, d_model = x.shape
        qkv = linear(x, self.in_proj).view(batch, seq, 3, self.nhead, d_model // self.nhead)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, nhead, seq, head_dim)
        if self.training and self.dropout > 0.0 and x.device.type == "cpu":
            out = attention_with_dropout_cpu(q, k, v, attn_mask, self.dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
            )
        out = out.transpose(1, 2).reshape(batch, seq, d_model)
        return linear(out, self.out_proj, residual=residual, dropout=dropout)


def attention_with_dropout_cpu(q, k, v, attn_mask, p):
    """softmax(q k^T / sqrt(head_dim)) v, with dropout on the attention probabilities.

    SDPA's fused CPU kernel has no dropout, so with dropout_p > 0 SDPA falls back to
    this same unfused math; written out, it skips SDPA's extra passes (safe softmax,
    scaling both q and k) and uses fast_dropout: ~20% less time in attention.
    """
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return fast_dropout(torch.softmax(scores, dim=-1), p, True) @ v


class TransformerEncoderLayer(nn.Module):
    """Post-LayerNorm block with GELU, as in BERT."""

    def __init__(self, d_model, nhead, dim_feedforward, dropout, layer_norm_eps=1e-12):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = Dropout(dropout)

    def forward(self, x, attn_mask=None):
        x = self.norm1(self.self_attn(x, attn_mask, residual=x, dropout=self.dropout))
        # No dropout on the feed-forward hidden activations: BERT's (and transformers')
        # placement, not nn.TransformerEncoderLayer's that the old example used.
        hidden = linear(x, self.linear1, gelu=True)
        return self.norm2(linear(hidden, self.linear2, residual=x, dropout=self.dropout))


def padding_attn_mask(src, pad_id):
    """Boolean (batch, 1, 1, seq) mask, True for real keys; None when no position is padding.

    Returning None for unpadded batches (every MLM batch) keeps SDPA on its fastest path.
    """
    keep = src.ne(pad_id)
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]


class BertModel(nn.Module):
    """Embedding followed by `nlayers` encoder layers; returns (batch, seq, emsize)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert_embed = BertEmbedding(config)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                config.emsize, config.nhead, config.nhid, config.dropout, config.layer_norm_eps
            )
            for _ in range(config.nlayers)
        )
        self.apply(init_bert_weights)

    def forward(self, src, token_type_input=None, attn_mask="auto"):
        """`attn_mask="auto"` derives the padding mask from `src` (pad_id positions are
        never attended). Callers that know the batch is unpadded may pass None."""
        if isinstance(attn_mask, str):
            attn_mask = padding_attn_mask(src, self.config.pad_id)
        x = self.bert_embed(src, token_type_input)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


def init_bert_weights(module):
    """BERT's init: N(0, 0.02) weights, zero biases, LayerNorm weight 1 / bias 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MLMTask(nn.Module):
    """Masked language model head: dense + GELU + LayerNorm, then the vocabulary projection.

    Only the masked positions are projected onto the vocabulary: with 15% masking this
    skips 85% of the largest matmul of the model.
    """

    def __init__(self, config):
        super().__init__()
        self.bert_model = BertModel(config)
        self.mlm_span = nn.Linear(config.emsize, config.emsize)
        self.norm_layer = nn.LayerNorm(config.emsize, eps=config.layer_norm_eps)
        self.mlm_head = nn.Linear(config.emsize, config.vocab_size)
        self.apply(init_bert_weights)

    def forward(self, src, masked_positions=None, token_type_input=None, attn_mask="auto"):
        """Returns logits (n_masked, vocab) for the True entries of the boolean
        `masked_positions` (batch, seq), in row-major order; (batch, seq, vocab) when None."""
        output = self.bert_model(src, token_type_input, attn_mask)
        if masked_positions is not None:
            output = output[masked_positions]
        return linear(self.norm_layer(linear(output, self.mlm_span, gelu=True)), self.mlm_head)


class NextSentenceTask(nn.Module):
    """Pooler (dense + tanh on the <cls> position) and a 2-way classifier."""

    def __init__(self, config):
        super().__init__()
        self.bert_model = BertModel(config)
        self.linear_layer = nn.Linear(config.emsize, config.emsize)
        self.ns_span = nn.Linear(config.emsize, 2)
        self.apply(init_bert_weights)

    def forward(self, src, token_type_input=None, attn_mask="auto"):
        output = self.bert_model(src, token_type_input, attn_mask)
        return self.ns_span(torch.tanh(self.linear_layer(output[:, 0])))


class QuestionAnswerTask(nn.Module):
    """Start and end logits for every token: (batch, seq) each."""

    def __init__(self, config):
        super().__init__()
        self.bert_model = BertModel(config)
        self.qa_span = nn.Linear(config.emsize, 2)
        self.apply(init_bert_weights)

    def forward(self, src, token_type_input=None, attn_mask="auto"):
        output = self.bert_model(src, token_type_input, attn_mask)
        if self.bert_model.config.qa_gelu:
            output = F.gelu(output)
        start_logits, end_logits = self.qa_span(output).unbind(dim=-1)
        return start_logits, end_logits


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def flops_per_token_train(config, seq_len, mask_frac):
    """Useful training FLOPs per input token of MLMTask (forward + backward = 3x forward).

    Counts matmuls only (2 FLOPs per multiply-add): q/k/v/out projections, attention
    scores and weighted sum, feed-forward, and the MLM head on the masked fraction only.
    """
    d, f, n = config.emsize, config.nhid, config.nlayers
    per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * seq_len * d
    head = mask_frac * 2 * (d * d + d * config.vocab_size)
    return 3 * (n * per_layer + head)

"""model.py: shapes, padding never attended, masked-only MLM head, BERT init, config."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model
from model import (
    BertConfig,
    BertModel,
    MLMTask,
    NextSentenceTask,
    QuestionAnswerTask,
    init_bert_weights,
    padding_attn_mask,
)

PAD = 1


def tiny_config(**overrides):
    fields = dict(vocab_size=50, emsize=32, nhead=4, nhid=64, nlayers=2, dropout=0.0,
                  max_len=64, pad_id=PAD)
    return BertConfig(**{**fields, **overrides})


def make_model(cls, seed=0, **overrides):
    torch.manual_seed(seed)
    model = cls(tiny_config(**overrides))
    # Off the initial values, so that a LayerNorm or bias that is skipped shows up.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def batch(batch_size=3, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (batch_size, seq), generator=g)
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    return ids, types


def pad(ids, types, extra):
    """Append `extra` padding positions (pad id, token type 0) to every row."""
    return (torch.cat([ids, torch.full((len(ids), extra), PAD)], 1),
            torch.cat([types, torch.zeros(len(ids), extra, dtype=types.dtype)], 1))


def test_shapes():
    ids, types = batch(batch_size=3, seq=12)
    assert make_model(BertModel)(ids, types).shape == (3, 12, 32)
    mlm = make_model(MLMTask)
    assert mlm(ids).shape == (3, 12, 50)
    masked = torch.zeros(3, 12, dtype=torch.bool)
    masked[0, 1] = masked[2, 5] = masked[2, 7] = True
    assert mlm(ids, masked).shape == (3, 50)
    assert make_model(NextSentenceTask)(ids, types).shape == (3, 2)
    start, end = make_model(QuestionAnswerTask)(ids, types)
    assert start.shape == end.shape == (3, 12)


def test_padding_mask():
    ids, _ = batch()
    assert padding_attn_mask(ids, PAD) is None  # unpadded: SDPA's fast path
    ids[1, 8:] = PAD
    mask = padding_attn_mask(ids, PAD)
    assert mask.shape == (3, 1, 1, 12) and mask.sum() == 3 * 12 - 4


@pytest.mark.parametrize("extra", [1, 7])
def test_padding_is_never_attended(extra):
    ids, types = batch()
    ids[2, 9:] = PAD  # a row already padded
    real = ids.ne(PAD)
    padded_ids, padded_types = pad(ids, types, extra)
    with torch.no_grad():
        encoder = make_model(BertModel)
        torch.testing.assert_close(encoder(padded_ids, padded_types)[:, :12][real],
                                   encoder(ids, types)[real], atol=1e-5, rtol=0)
        ns = make_model(NextSentenceTask)
        torch.testing.assert_close(ns(padded_ids, padded_types), ns(ids, types), atol=1e-5, rtol=0)
        qa = make_model(QuestionAnswerTask)
        for got, expected in zip(qa(padded_ids, padded_types), qa(ids, types)):
            torch.testing.assert_close(got[:, :12][real], expected[real], atol=1e-5, rtol=0)


def test_padding_changes_outputs_when_attended():
    # The check above has teeth: the same padding, attended, moves the outputs.
    ids, types = batch()
    padded_ids, padded_types = pad(ids, types, 5)
    encoder = make_model(BertModel)
    with torch.no_grad():
        attended = encoder(padded_ids, padded_types, attn_mask=None)[:, :12]
        assert not torch.allclose(attended, encoder(ids, types), atol=1e-3)


def test_masked_only_head_loss_equals_full_head_loss():
    model = make_model(MLMTask)
    ids, _ = batch(batch_size=4, seq=16)
    g = torch.Generator().manual_seed(3)
    masked = torch.rand(ids.shape, generator=g) < 0.3
    masked[:, 0] = False
    targets = torch.randint(5, 50, (int(masked.sum()),), generator=g)
    with torch.no_grad():
        selected = model(ids, masked)
        full = model(ids)
    torch.testing.assert_close(selected, full[masked], atol=1e-5, rtol=0)
    torch.testing.assert_close(F.cross_entropy(selected, targets),
                               F.cross_entropy(full[masked], targets), atol=1e-6, rtol=0)


def test_masked_only_head_gradients_equal_full_head_gradients():
    ids, _ = batch(batch_size=2, seq=10)
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, [2, 5]] = masked[1, 7] = True
    targets = torch.tensor([7, 8, 9])
    grads = []
    for select in (True, False):
        model = make_model(MLMTask)
        logits = model(ids, masked) if select else model(ids)[masked]
        F.cross_entropy(logits, targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [BertModel, MLMTask, NextSentenceTask, QuestionAnswerTask])
def test_bert_init(cls):
    torch.manual_seed(0)
    model = cls(BertConfig(vocab_size=2000, emsize=128, nhead=4, nhid=256, nlayers=2))
    n_linear = n_norm = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            if weight.numel() >= 256:  # enough values for a meaningful std
                assert weight.std().item() == pytest.approx(0.02, rel=0.15), name
                assert abs(weight.mean().item()) < 0.005, name
            n_linear += 1
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert (module.bias == 0).all(), name
        if isinstance(module, nn.LayerNorm):
            assert (module.weight == 1).all() and (module.bias == 0).all(), name
            n_norm += 1
    assert n_linear >= 2 * 4 + 3 and n_norm >= 2 * 2 + 1  # every layer was looked at


def test_init_bert_weights_resets_every_kind():
    layer, norm = nn.Linear(64, 64), nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.fill_(3)
    for module in (layer, norm):
        init_bert_weights(module)
    assert (layer.bias == 0).all() and (norm.weight == 1).all()


def test_config_round_trip():
    config = tiny_config(nlayers=3, qa_gelu=False, layer_norm_eps=1e-6)
    again = BertConfig.from_dict(config.to_dict())
    assert again == config
    # The config alone rebuilds a model the weights load into.
    state = MLMTask(config).state_dict()
    MLMTask(again).load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match="unknown config keys"):
        BertConfig.from_dict({**config.to_dict(), "hidden_size": 32})


def test_sequences_longer_than_max_len_are_refused():
    model = make_model(BertModel, max_len=8)
    with pytest.raises(ValueError, match="longer than"):
        model(torch.full((1, 9), 7))


def test_emsize_not_divisible_by_nhead_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        BertModel(tiny_config(emsize=30, nhead=4))


###############################################################################
# model.linear: oneDNN on the CPU, F.linear elsewhere; same math either way
###############################################################################


def plain_linear(x, layer, gelu=False, residual=None):
    y = F.linear(x, layer.weight, layer.bias)
    y = F.gelu(y) if gelu else y
    return y if residual is None else residual + y


@pytest.mark.skipif(not model.ONEDNN, reason="oneDNN linear layers are off here")
@pytest.mark.parametrize("gelu, residual", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (0, 24)])
def test_linear_on_onednn_equals_f_linear(shape, gelu, residual, monkeypatch):
    torch.manual_seed(0)
    layer = nn.Linear(24, 24)
    x = torch.randn(*shape)
    res = torch.randn(*shape[:-1], 24) if residual else None
    calls = []
    onednn = model._onednn_linear
    monkeypatch.setattr(model, "_onednn_linear", lambda *a: calls.append(1) or onednn(*a))
    with torch.no_grad():  # inference: one fused call
        fused = model.linear(x, layer, gelu=gelu, residual=res)
    torch.testing.assert_close(fused, plain_linear(x, layer, gelu, res), atol=1e-5, rtol=1e-5)
    # Training: the autograd Function, whose gradients must be F.linear's.
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [model.linear(xs[0], layer, gelu=gelu, residual=res)]
    grads_ours = torch.autograd.grad(outs[0].square().sum(), [xs[0], *layer.parameters()])
    outs.append(plain_linear(xs[1], layer, gelu, res))
    grads_ref = torch.autograd.grad(outs[1].square().sum(), [xs[1], *layer.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for ours, ref in zip(grads_ours, grads_ref, strict=True):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    if not (residual and not gelu):  # the fused residual add calls oneDNN directly
        assert len(calls) == 3  # oneDNN in inference, forward and input gradient


@pytest.mark.skipif(not model.ONEDNN, reason="oneDNN linear layers are off here")
def test_frozen_weights_get_only_the_input_gradient():
    layer = nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)
    model.linear(x, layer).sum().backward()
    assert x.grad is not None and layer.weight.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, 8))


def test_linear_obeys_autocast_and_dropout():
    torch.manual_seed(0)
    layer, x = nn.Linear(16, 16), torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.linear(x, layer, gelu=True).dtype == torch.bfloat16
    dropout = model.Dropout(0.5).train()
    with torch.no_grad():
        y = model.linear(x, layer, residual=torch.zeros(4, 16), dropout=dropout)
    assert (y == 0).float().mean() > 0.3  # dropped, not fused away


def test_fast_inference_equals_the_training_path_and_plain_pytorch(monkeypatch):
    """The whole QA model in eval mode, padding included: no_grad (fused oneDNN calls)
    == grad enabled (the autograd Function) == F.linear everywhere (oneDNN off)."""
    qa = make_model(QuestionAnswerTask)
    ids, types = batch()
    ids[0, 8:] = PAD
    with torch.no_grad():
        fast = qa(ids, types)
    training_path = [t.detach() for t in qa(ids, types)]
    monkeypatch.setattr(model, "ONEDNN", False)
    with torch.no_grad():
        plain = qa(ids, types)
    for a, b, c in zip(fast, training_path, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)

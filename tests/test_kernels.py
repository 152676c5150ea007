"""kernels.py: every fast CPU kernel computes what the plain PyTorch operation computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import model
from model import BertConfig, QuestionAnswerTask

ATOL = 1e-5


@pytest.mark.skipif(not kernels.ONEDNN, reason="the oneDNN matmul is off here (not x86-64, "
                    "no oneDNN in this PyTorch, or BERT_ONEDNN=0)")
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (0, 24)])
def test_linear_inference_on_onednn_equals_f_linear(shape, monkeypatch):
    torch.manual_seed(0)
    layer = kernels.Linear(24, 16)
    x = torch.randn(*shape)
    calls = []
    onednn = kernels.onednn_linear
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: calls.append(1) or onednn(*a))
    with torch.no_grad():
        got = layer(x)
    assert calls, "the oneDNN path was not taken"
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), atol=ATOL, rtol=1e-5)


def test_linear_trains_with_f_linear_and_obeys_autocast(monkeypatch):
    torch.manual_seed(0)
    layer, x = kernels.Linear(16, 8), torch.randn(4, 16, requires_grad=True)
    monkeypatch.setattr(kernels, "onednn_linear", lambda *a: pytest.fail("oneDNN in training"))
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_linear_keeps_nn_linear_state_dict_keys():
    assert kernels.Linear(4, 3).state_dict().keys() == nn.Linear(4, 3).state_dict().keys()


def test_whole_model_inference_equals_plain_pytorch(monkeypatch):
    """The QA model in eval mode, padding included: oneDNN on == oneDNN off."""
    torch.manual_seed(0)
    qa = QuestionAnswerTask(BertConfig(vocab_size=50, emsize=32, nhead=4, nhid=64, nlayers=2,
                                       dropout=0.0, max_len=64)).eval()
    ids = torch.randint(5, 50, (3, 12))
    ids[0, 8:] = 1
    mask = model.padding_mask(ids, 1)
    with torch.no_grad():
        fast = qa(ids, None, mask)
        monkeypatch.setattr(kernels, "ONEDNN", False)
        plain = qa(ids, None, mask)
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_cpu_attention_matches_sdpa(padded):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g) for _ in range(3))
    attn_mask = None
    if padded:
        attn_mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
        attn_mask[1, ..., 6:] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    # The written-out path with its dropout made the identity: only the attention math left.
    torch.manual_seed(0)
    got = kernels.attention(q, k, v, attn_mask, dropout_p=1e-9)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_cpu_attention_drops_probabilities():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=g) for _ in range(3))
    torch.manual_seed(0)
    dropped = kernels.attention(q, k, v, None, dropout_p=0.5)
    assert not torch.allclose(dropped, F.scaled_dot_product_attention(q, k, v), atol=1e-2)


def test_fast_dropout_keeps_1_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 1.0  # no zeros: a dropped element is exactly 0
    x.requires_grad_()
    y = kernels.dropout(x, 0.2, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.8) < 0.01  # 200k draws: sd 0.0009
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    assert kernels.dropout(x, 0.2, training=False) is x
    assert (kernels.Dropout(0.5).eval()(x) == x).all()

"""model.py's CPU kernels: each computes what the plain PyTorch operation computes."""

import pytest
import torch
import torch.nn.functional as F

import model as kernels

ATOL = 1e-5


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


def test_packing_keeps_the_real_tokens_in_order_and_puts_them_back():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False],
                         [True, True, True, True]])
    x = torch.arange(12.0).view(3, 4, 1).expand(3, 4, 2)
    packing = kernels.packing(mask, torch.device("cpu"))
    packed = packing.pack(x)
    assert packed[:, 0].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert packing.first_tokens(packed)[:, 0].tolist() == [0, 4, 8]  # each row's <cls>
    assert torch.equal(packing.unpack(packed), x * mask[..., None])
    assert kernels.packing(torch.ones(2, 3, dtype=torch.bool), torch.device("cpu")) is None
    assert kernels.packing(None, torch.device("cpu")) is None

"""The fused CPU dropout (deformable_detr::dropout_forward / dropout_backward, layers.Dropout).

References are independent of the kernel: a NumPy Philox4x32-10 checked against the Random123
known-answer vectors gives the exact mask for a given seed, PyTorch's own dropout formula
(``x * mask.div(1 - p)``) the values, and binomial statistics the drop rate.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deformable_detr.layers import Dropout, fused_dropout, has_fused_dropout
from deformable_detr.modeling.deformable_decoder import DeformableTransformerDecoderLayer
from deformable_detr.modeling.deformable_encoder import DeformableTransformerEncoderLayer

pytestmark = pytest.mark.skipif(not has_fused_dropout(), reason="compiled dropout op missing")

DTYPES = [torch.float32, torch.float64]


def _op():
    return torch.ops.deformable_detr


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Random123's Philox4x32-10. ctr: uint32 [..., 4]; returns uint32 [..., 4]."""
    c = [ctr[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & m32, (p0 >> np.uint64(32)) ^ c[3] ^ k1,
             p0 & m32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & m32
        k1 = (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack(c, -1).astype(np.uint32)


def reference_uniforms(seed: int, n: int) -> np.ndarray:
    """The kernel's documented layout: element i takes word (i % 64) // 16 of the block at
    counter (i // 64) * 16 + i % 16 (key = the 64-bit seed)."""
    i = np.arange(n, dtype=np.uint64)
    counter = (i // np.uint64(64)) * np.uint64(16) + i % np.uint64(16)
    ctr = np.zeros((n, 4), np.uint32)
    ctr[:, 0] = (counter & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    ctr[:, 1] = (counter >> np.uint64(32)).astype(np.uint32)
    seed &= (1 << 64) - 1
    words = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))
    return words[np.arange(n), ((i % np.uint64(64)) // np.uint64(16)).astype(np.int64)]


def test_philox_reference_known_answers():
    kat = [  # Random123 kat_vectors: counter, key, result
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in kat:
        got = philox4x32_10(np.array([ctr], np.uint32), key)[0]
        assert [int(v) for v in got] == list(expected)


@pytest.mark.parametrize("seed", [0, 12345, -2, (1 << 63) - 1])
@pytest.mark.parametrize("n", [1, 63, 64, 1000, 4097])
def test_mask_is_philox(seed, n):
    p = 0.3
    _, mask = _op().dropout_forward(torch.randn(n), p, seed)
    u = reference_uniforms(seed, n)
    expected = u >= np.uint64(round(p * 2**32))
    assert np.array_equal(mask.numpy(), expected)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_drop_rate(p):
    n = 1_000_000
    torch.manual_seed(0)
    out, mask = _op().dropout_forward(torch.ones(n), p)
    dropped = n - int(mask.sum())
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 5 * sigma
    assert int((out == 0).sum()) == dropped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_values_match_pytorch_formula(dtype, p):
    x = torch.randn(3, 1000, 7, dtype=dtype)
    x[0, 0, :3] = torch.tensor([float("inf"), float("nan"), -0.0], dtype=dtype)
    out, mask = _op().dropout_forward(x, p, 7)
    # PyTorch's CPU dropout: x * bernoulli_mask.div_(1 - p).
    expected = x * mask.to(dtype).div_(1 - p)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    kept = mask & x.isfinite()
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=2 ** -50 if dtype ==
                               torch.float64 else 2 ** -23, atol=0)
    assert mask.dtype == torch.bool and out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    x = torch.randn(10000).to(dtype)
    out, mask = _op().dropout_forward(x, 0.2, 3)
    assert out.dtype == dtype
    expected = (x.float() * mask.float() * (1 / 0.8)).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward(dtype):
    x = torch.randn(257, 33, dtype=dtype, requires_grad=True)
    g = torch.randn(257, 33, dtype=dtype)
    torch.manual_seed(5)
    y = fused_dropout(x, 0.25)
    y.backward(g)
    torch.manual_seed(5)
    _, mask = _op().dropout_forward(x.detach(), 0.25)
    torch.testing.assert_close(x.grad, g * mask.to(dtype).div_(0.75), rtol=0, atol=0)
    grad = _op().dropout_backward(g, mask, 1 / 0.75)
    torch.testing.assert_close(grad, g * mask.to(dtype) * (1 / 0.75), rtol=0, atol=0)


def test_gradcheck():
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)

    def f(x):
        torch.manual_seed(11)  # the same mask at every evaluation
        return fused_dropout(x, 0.4)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_reproducible_and_fresh():
    x = torch.randn(5000)
    torch.manual_seed(1)
    a = fused_dropout(x, 0.5)
    b = fused_dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(fused_dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_independent_of_threads():
    x = torch.randn(300_001)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            torch.manual_seed(2)
            outs.append(fused_dropout(x, 0.3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_non_contiguous_and_empty():
    x = torch.randn(64, 48).t()
    out, mask = _op().dropout_forward(x, 0.5, 9)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x * mask.to(x.dtype) * 2.0, rtol=0, atol=0)
    out, mask = _op().dropout_forward(torch.empty(0, 3), 0.5)
    assert out.shape == (0, 3) and mask.shape == (0, 3)


def test_p_edges():
    x = torch.randn(1000)
    x[0] = float("inf")
    out, mask = _op().dropout_forward(x, 0.0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr() and bool(mask.all())
    out, mask = _op().dropout_forward(x, 1.0)
    torch.testing.assert_close(out, F.dropout(x, 1.0, True), rtol=0, atol=0, equal_nan=True)
    assert not bool(mask.any())
    xg = x.clone().requires_grad_()
    fused_dropout(xg, 1.0).backward(torch.ones(1000))
    assert torch.equal(xg.grad, torch.zeros(1000))
    assert fused_dropout(x, 0.0) is x


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_p(p):
    with pytest.raises(RuntimeError, match="must be in \\[0, 1\\]"):
        _op().dropout_forward(torch.randn(4), p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        fused_dropout(torch.randn(4), p)


def test_bad_dtype():
    with pytest.raises(RuntimeError, match="float32, float64"):
        _op().dropout_forward(torch.ones(4, dtype=torch.int64), 0.5)


def test_module():
    m = Dropout(0.2)
    x = torch.randn(100, 10)
    m.eval()
    assert m(x) is x
    m.train()
    y = m(x)
    assert y.shape == x.shape and bool(((y == 0) | torch.isclose(y, x / 0.8)).all())
    with pytest.raises(ValueError, match="inplace"):
        Dropout(0.1, inplace=True)
    assert isinstance(m, torch.nn.Dropout) and not list(m.parameters())


def test_without_compiled_op_is_pytorch_dropout(monkeypatch):
    import deformable_detr.layers.dropout as mod

    monkeypatch.setattr(mod, "_HAS_OP", False)
    x = torch.randn(100)
    torch.manual_seed(0)
    y = Dropout(0.5)(x)
    torch.manual_seed(0)
    assert torch.equal(y, F.dropout(x, 0.5, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_pytorch_dropout():
    x = torch.randn(1000, device="cuda")
    torch.manual_seed(0)
    y = Dropout(0.3)(x)
    torch.manual_seed(0)
    assert y.device == x.device and torch.equal(y, F.dropout(x, 0.3, True))


def test_state_dict_keys_unchanged():
    enc = DeformableTransformerEncoderLayer(32, 64, 0.1, 2, 4, 2)
    dec = DeformableTransformerDecoderLayer(32, 64, 0.1, 2, 4, 2)
    for layer in (enc, dec):
        assert all(type(m) is Dropout for n, m in layer.named_modules() if "dropout" in n)
    assert not any("dropout" in k for k in enc.state_dict())
    assert [k for k in enc.state_dict()] == [
        k for k, _ in enc.named_parameters()] + [k for k, _ in enc.named_buffers()]


def test_opcheck():
    x = torch.randn(8, 5)
    torch.library.opcheck(_op().dropout_forward, (x, 0.3, 4),
                          test_utils=("test_schema", "test_faketensor"))
    mask = torch.rand(8, 5) > 0.5
    torch.library.opcheck(_op().dropout_backward, (x, mask, 2.0),
                          test_utils=("test_schema", "test_faketensor"))

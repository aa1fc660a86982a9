"""The fused loops of model/loops.py against the numpy ufunc chains they replace (bits, for
the elementwise GELU; float64 rounding where a sum's order changed), and the blocked causal
attention against one block (docs/design.md#fused-elementwise-loops)."""

import os

import numpy as np
import pytest

from mpigpt2.model import ops
from mpigpt2.model.ops import GELU_CUBE, GELU_SCALE, LN_EPS

rng = np.random.default_rng(11)


def gelu_chain(x):
    """The ufunc chain of GELU forward before the fused loops: (gelu(x), th)."""
    th = x * x
    th *= GELU_CUBE
    th += 1.0
    th *= x
    th *= GELU_SCALE
    np.tanh(th, out=th)
    out = th + 1.0
    out *= x
    out *= 0.5
    return out, th


def gelu_grad_chain(dout, x, th):
    du = x * x
    du *= 3.0 * GELU_CUBE * GELU_SCALE
    du += GELU_SCALE
    du *= x
    sech2 = th * th
    np.subtract(1.0, sech2, out=sech2)
    du *= sech2
    du += th
    du += 1.0
    du *= 0.5
    du *= dout
    return du


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_bits_equal_the_ufunc_chain(dtype):
    x = (rng.standard_normal((37, 53)) * 4).astype(dtype)  # odd sizes: vector tails
    dout = rng.standard_normal(x.shape).astype(dtype)
    out, th = ops.gelu_forward(x)
    want_out, want_th = gelu_chain(x)
    assert out.dtype == th.dtype == dtype
    np.testing.assert_array_equal(th, want_th)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(ops.gelu_recompute(x, th), want_out)
    np.testing.assert_array_equal(ops.gelu_backward(dout, x, th),
                                  gelu_grad_chain(dout, x, want_th))


def layernorm_ref(x, w, b):
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + LN_EPS)
    norm = (x - mean) * rstd
    return norm * w + b, norm, rstd


@pytest.mark.parametrize("C", [8, 37, 48])
def test_layernorm_against_float64_formula(C):
    x = rng.standard_normal((9, C)) * 3 + 1
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    got, want = ops.layernorm_forward(x, w, b), layernorm_ref(x, w, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-13)
    dout, res = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    _, norm, rstd = want
    dnorm = dout * w
    dx = (dnorm - dnorm.mean(1, keepdims=True)
          - norm * (dnorm * norm).mean(1, keepdims=True)) * rstd
    np.testing.assert_allclose(ops.layernorm_backward_input(dout, norm, rstd, w), dx,
                               rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ops.layernorm_backward_input(dout, norm, rstd, w, res), dx + res,
                               rtol=1e-12, atol=1e-13)


def attention(P, S, block, seed=3):
    """Forward and backward of one slice with a random prefix; float64."""
    r = np.random.default_rng(seed)
    b, NH, hs, T = 2, 3, 4, P + S + 2
    qkv = r.standard_normal((b * S, 3 * NH * hs))
    k, v = np.zeros((b, NH, T, hs)), np.zeros((b, NH, T, hs))
    k[:, :, :P], v[:, :, :P] = r.standard_normal((2, b, NH, P, hs))
    dk, dv = r.standard_normal((2, b, NH, T, hs))  # later slices' contributions
    out, q, att = ops.attention_forward(qkv, k, v, b, NH, P, block)
    dout = r.standard_normal(out.shape)
    dqkv = ops.attention_backward(dout, q, att, k, v, dk, dv, P, block)
    return out, att, dqkv, dk, dv


@pytest.mark.parametrize("P,S", [(0, 7), (5, 7), (3, 1), (0, 16)])
@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_blocked_attention_equals_one_block(P, S, block):
    want = attention(P, S, S)
    got = attention(P, S, block)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    att = got[1]
    masked = np.arange(P + S)[None, :] > P + np.arange(S)[:, None]  # (S, P+S)
    assert not att[:, :, masked].any()  # zero where masked, whatever the block
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-13)


def test_only_the_old_closures_cache_files_are_removed(tmp_path):
    from mpigpt2.model import kernels
    stale = ["kernels._layernorm.locals.layernorm-89.py311.433.nbc",
             "kernels._scores.locals.scores_grad-171.py311.nbi",
             "kernels._dot.locals.dot-36.py311.1.nbc",
             "kernels._gelu.locals.gelu_grad-72.py311.nbi"]
    kept = ["kernels.cpython-311.pyc", "loops.layernorm-64.py311.nbi", "loops.dot-22.py311.1.nbc",
            "optim._fused_kernel.locals.adamw_fused-20.py311.nbi", "kernels._scores.txt"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    kernels._drop_stale_caches(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(kept)

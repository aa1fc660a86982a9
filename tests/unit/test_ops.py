"""Each op's backward against float64 central finite differences."""

import numpy as np
import pytest

from mpigpt2.model import ops
from tolerances import FD_RTOL, FD_STEP

rng = np.random.default_rng(0)


def numgrad(f, x):
    """Central differences of scalar f() with respect to every entry of x (in place)."""
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + FD_STEP
        fp = f()
        flat[i] = old - FD_STEP
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * FD_STEP)
    return g


def close(a, b):
    scale = max(np.abs(b).max(), 1e-12)
    assert np.abs(a - b).max() <= FD_RTOL * scale, np.abs(a - b).max() / scale


def test_layernorm():
    x, w, b = rng.normal(size=(5, 8)), rng.normal(size=8), rng.normal(size=8)
    R = rng.normal(size=(5, 8))
    f = lambda: float((ops.layernorm_forward(x, w, b)[0] * R).sum())
    out, norm, rstd = ops.layernorm_forward(x, w, b)
    dw, db = np.zeros(8), np.zeros(8)
    dx = ops.layernorm_backward(R, norm, rstd, w, dw, db)
    close(dx, numgrad(f, x))
    close(dw, numgrad(f, w))
    close(db, numgrad(f, b))


def test_matmul():
    x, w, b = rng.normal(size=(6, 4)), rng.normal(size=(3, 4)), rng.normal(size=3)
    R = rng.normal(size=(6, 3))
    f = lambda: float((ops.matmul_forward(x, w, b) * R).sum())
    dw, db = np.zeros_like(w), np.zeros_like(b)
    dx = ops.matmul_backward(R, x, w, dw, db)
    close(dx, numgrad(f, x))
    close(dw, numgrad(f, w))
    close(db, numgrad(f, b))


def test_gelu():
    x = rng.normal(size=(4, 7)) * 2
    R = rng.normal(size=(4, 7))
    f = lambda: float((ops.gelu_forward(x)[0] * R).sum())
    out, th = ops.gelu_forward(x)
    np.testing.assert_allclose(ops.gelu_recompute(x, th), out, rtol=1e-15)
    close(ops.gelu_backward(R, x, th), numgrad(f, x))


def test_encoder():
    wte, wpe = rng.normal(size=(10, 4)), rng.normal(size=(8, 4))
    tokens = np.array([[1, 3, 3], [7, 1, 0]])
    R = rng.normal(size=(6, 4))
    f = lambda: float((ops.encoder_forward(wte, wpe, tokens, 2) * R).sum())
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    ops.encoder_backward(dwte, dwpe, R, tokens, 2)
    close(dwte, numgrad(f, wte))
    close(dwpe, numgrad(f, wpe))


@pytest.mark.parametrize("P,S", [(0, 5), (3, 2), (4, 1)])
def test_attention_slice(P, S):
    """One slice with a cached prefix: gradients w.r.t. its qkv and the cached keys/values."""
    b, NH, hs, T = 2, 2, 3, 8
    C = NH * hs
    qkv = rng.normal(size=(b * S, 3 * C))
    kpre, vpre = rng.normal(size=(b, NH, P, hs)), rng.normal(size=(b, NH, P, hs))
    R = rng.normal(size=(b * S, C))

    def run():
        k, v = np.zeros((b, NH, T, hs)), np.zeros((b, NH, T, hs))
        k[:, :, :P], v[:, :, :P] = kpre, vpre
        return ops.attention_forward(qkv, k, v, b, NH, P), k, v

    f = lambda: float((run()[0][0] * R).sum())
    (out, q, att), k, v = run()
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    dqkv = ops.attention_backward(R, q, att, k, v, dk, dv, P)
    close(dqkv, numgrad(f, qkv))
    if P:
        close(dk[:, :, :P], numgrad(f, kpre))
        close(dv[:, :, :P], numgrad(f, vpre))
    assert np.all(dk[:, :, P + S:] == 0) and np.all(dv[:, :, P + S:] == 0)


def test_attention_causal():
    """The output at a position does not depend on later tokens."""
    b, NH, hs, S = 1, 2, 4, 6
    qkv = rng.normal(size=(S, 3 * NH * hs))
    k, v = np.zeros((b, NH, S, hs)), np.zeros((b, NH, S, hs))
    out1 = ops.attention_forward(qkv, k, v, b, NH, 0)[0]
    qkv2 = qkv.copy()
    qkv2[4:] += 1.0
    out2 = ops.attention_forward(qkv2, k, v, b, NH, 0)[0]
    np.testing.assert_array_equal(out1[:4], out2[:4])
    assert not np.allclose(out1[4:], out2[4:])


def test_crossentropy():
    V, Vp, N = 7, 10, 5
    logits = rng.normal(size=(N, Vp))
    targets = rng.integers(0, V, N)
    dloss = 0.3

    def f():
        z = logits[:, :V] - logits[:, :V].max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-lp[np.arange(N), targets].sum() * dloss)

    want = numgrad(f, logits)
    d = logits.copy()
    losses = ops.crossentropy_forward_backward(d, targets, V, dloss)
    close(d, want)
    assert np.all(d[:, V:] == 0)
    np.testing.assert_allclose(losses.sum() * dloss, f(), rtol=1e-12)

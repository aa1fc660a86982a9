"""AdamW: the fused step bit for bit against plain numpy, the update against
torch.optim.AdamW, and float32 training against float64."""

import numpy as np
import pytest
import torch

from mpigpt2.model.optim import AdamW, lr_at, clip_scale
from test_model import random_model, SMALL
from tolerances import ADAM_RTOL, F32_VS_F64_LOSS


def reference_step(p, g, m, v, t, lr, scale, beta1, beta2, eps, wd):
    """The update as plain whole-array numpy, one operation at a time, every scalar rounded
    to the array dtype once: the arithmetic AdamW.step's fused loop must reproduce exactly."""
    d = p.dtype.type
    g = g * d(scale)
    m[...] = m * d(beta1) + g * d(1.0 - beta1)
    v[...] = v * d(beta2) + (g * g) * d(1.0 - beta2)
    divisor = d((1.0 - beta1 ** t) / lr) if lr else d(np.inf)
    u = m / ((np.sqrt(v * d(1.0 / (1.0 - beta2 ** t))) + d(eps)) * divisor)
    if wd != 0.0:
        u = u + p * d(lr * wd)
    p -= u


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("n", [1, 7, 100_003])
def test_fused_step_is_bit_identical_to_plain_numpy(dtype, wd, scale, n):
    """Several steps on random odd-sized data, the parameters a slice at an odd offset of a
    larger buffer (as ZeRO-1's shards are): parameters and both moments equal bit for bit,
    and nothing outside the slice moves."""
    rng = np.random.default_rng(n)
    buf = rng.normal(size=n + 8).astype(dtype)
    start = buf.copy()
    p, p_ref = buf[3:3 + n], buf[3:3 + n].copy()
    opt = AdamW(n, dtype, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=wd)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    bits = np.uint32 if dtype == np.float32 else np.uint64
    for t in range(1, 6):
        g = (rng.normal(size=n) * rng.choice([1e-4, 1.0, 30.0], size=n)).astype(dtype)
        lr = 3e-3 / t
        opt.step(p, g, t, lr, scale)
        reference_step(p_ref, g, m, v, t, lr, scale, 0.8, 0.95, 1e-6, wd)
        for ours, ref in ((p, p_ref), (opt.m, m), (opt.v, v)):
            np.testing.assert_array_equal(ours.view(bits), ref.view(bits))
    np.testing.assert_array_equal(buf[:3], start[:3])
    np.testing.assert_array_equal(buf[3 + n:], start[3 + n:])


def test_update_matches_torch_adamw():
    rng = np.random.default_rng(0)
    p = rng.normal(size=100_000)  # spans several optimizer chunks
    opt = AdamW(p.size, np.float64, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    tp = torch.tensor(p.copy(), requires_grad=True)
    # torch's decoupled decay multiplies by (1 - lr*wd) first; llm.c adds wd*param to the
    # update: identical in exact arithmetic
    topt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for t in range(1, 6):
        g = rng.normal(size=p.size)
        opt.step(p, g, t, 1e-2)
        tp.grad = torch.tensor(g)
        topt.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=ADAM_RTOL, atol=1e-12)


def test_float32_training_tracks_float64():
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 61, (4, 16)), rng.integers(0, 61, (4, 16))
    losses = {}
    for dt in (np.float32, np.float64):
        m = random_model(SMALL, dt)
        opt = AdamW(m.flat.size, dt)
        losses[dt] = []
        for t in range(1, 11):
            m.zero_grad()
            losses[dt].append(m.forward(tokens, targets))
            m.backward()
            opt.step(m.flat, m.grad_flat, t, 1e-3)
    assert losses[np.float64][-1] < losses[np.float64][0] - 0.1  # it does learn
    np.testing.assert_allclose(losses[np.float32], losses[np.float64], rtol=0,
                               atol=F32_VS_F64_LOSS)


def test_lr_schedule_and_clip():
    assert lr_at(0, 1.0, 10, warmup_steps=4) == 0.25
    assert lr_at(3, 1.0, 10, warmup_steps=4) == 1.0
    assert lr_at(7, 1.0, 10) == 1.0
    assert abs(lr_at(4, 1.0, 10, 4, "cosine", 0.1) - 1.0) < 1e-12
    assert abs(lr_at(10, 1.0, 10, 4, "cosine", 0.1) - 0.1) < 1e-12
    assert clip_scale(2.0, 1.0) < 0.5 + 1e-6 and clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(5.0, 0.0) == 1.0


def test_clipped_update_matches_torch():
    """--grad-clip: our global-norm scale and the scaled AdamW update against torch's
    clip_grad_norm_ + AdamW (float64, several parameter tensors, a norm above the limit)."""
    rng = np.random.default_rng(3)
    sizes = [5000, 70_000]
    flat = rng.normal(size=sum(sizes))
    opt = AdamW(flat.size, np.float64, weight_decay=0.01)
    tps = [torch.tensor(a.copy(), requires_grad=True) for a in np.split(flat, [sizes[0]])]
    topt = torch.optim.AdamW(tps, lr=1e-3, weight_decay=0.01)
    for t in range(1, 5):
        g = 3.0 * rng.normal(size=flat.size)
        scale = clip_scale(float(np.sqrt(g @ g)), 1.0)
        assert scale < 0.01  # clipping is active
        opt.step(flat, g, t, 1e-3, grad_scale=scale)
        for tp, part in zip(tps, np.split(g, [sizes[0]])):
            tp.grad = torch.tensor(part.copy())
        torch.nn.utils.clip_grad_norm_(tps, 1.0)
        topt.step()
        np.testing.assert_allclose(flat, np.concatenate([tp.detach().numpy() for tp in tps]),
                                   rtol=ADAM_RTOL, atol=1e-12)


def test_zero_lr_moves_the_moments_only():
    rng = np.random.default_rng(4)
    p = rng.normal(size=1000)
    before = p.copy()
    opt = AdamW(p.size, np.float64, weight_decay=0.1)
    g = rng.normal(size=p.size)
    opt.step(p, g, 1, 0.0)
    np.testing.assert_array_equal(p, before)
    np.testing.assert_allclose(opt.m, 0.1 * g)
    np.testing.assert_allclose(opt.v, 0.001 * g * g)

"""The whole model against an independent PyTorch implementation (autograd)."""

import numpy as np
import pytest
import torch

from mpigpt2.model.config import GPTConfig, PRESETS
from mpigpt2.model.gpt import GPT
from torch_ref import to_torch, gpt2_loss
from tolerances import TORCH64_ATOL, TORCH32_RTOL, TORCH32_LOSS

SMALL = GPTConfig(max_seq_len=32, vocab_size=61, padded_vocab_size=64, num_layers=3,
                  num_heads=4, channels=16)


def random_model(cfg, dtype, seed=0):
    """GPT-2 init plus noise on every parameter, so LayerNorms and biases are exercised."""
    m = GPT(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    m.flat[:] += rng.normal(0, 0.05, m.flat.shape).astype(dtype)
    m.params["wte"][cfg.vocab_size:] = 0
    return m


def grads_vs_torch(m, tokens, targets, slice_tokens=None, tdtype=torch.float64):
    m.zero_grad()
    loss = m.forward(tokens, targets, slice_tokens)
    m.backward()
    t = to_torch(m.params, tdtype)
    ref = gpt2_loss(t, tokens, targets, m.cfg)
    ref.backward()
    return loss, ref.item(), {n: t[n].grad.numpy() for n in t}


@pytest.mark.parametrize("k", [None, 8, 1])
def test_float64_exact(k):
    m = random_model(SMALL, np.float64)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 61, (3, 24)), rng.integers(0, 61, (3, 24))
    loss, ref, g = grads_vs_torch(m, tokens, targets, k)
    assert abs(loss - ref) < TORCH64_ATOL
    for n in g:
        np.testing.assert_allclose(m.grads[n], g[n], rtol=0, atol=TORCH64_ATOL, err_msg=n)


def test_float32_close():
    m = random_model(SMALL, np.float32)
    rng = np.random.default_rng(2)
    tokens, targets = rng.integers(0, 61, (4, 32)), rng.integers(0, 61, (4, 32))
    loss, ref, g = grads_vs_torch(m, tokens, targets)
    assert abs(loss - ref) < TORCH32_LOSS
    for n in g:
        err = np.abs(m.grads[n] - g[n]).max() / np.abs(g[n]).max()
        assert err < TORCH32_RTOL, (n, err)


def test_logits_match_torch():
    m = random_model(SMALL, np.float64)
    tokens = np.random.default_rng(3).integers(0, 61, (2, 10))
    _, ref_logits = gpt2_loss(to_torch(m.params), tokens, tokens, SMALL, return_logits=True)
    np.testing.assert_allclose(m.logits(tokens), ref_logits.detach().numpy(), atol=1e-12)


def test_gpt2_124m_shape():
    """A GPT-2 124M-shaped model, float32, forward and every gradient against PyTorch."""
    cfg = PRESETS["gpt2-124m"]
    m = GPT(cfg, dtype=np.float32, seed=5)
    rng = np.random.default_rng(4)
    tokens, targets = rng.integers(0, 50257, (2, 32)), rng.integers(0, 50257, (2, 32))
    loss, ref, g = grads_vs_torch(m, tokens, targets, tdtype=torch.float32)
    assert abs(loss - ref) < TORCH32_LOSS
    for n in g:
        err = np.abs(m.grads[n] - g[n]).max() / np.abs(g[n]).max()
        assert err < TORCH32_RTOL, (n, err)

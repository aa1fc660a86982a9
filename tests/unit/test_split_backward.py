"""The split backward (issue 13): I (input gradient, dK/dV) and W (weight gradients) of each
(micro-batch, slice). B = I + W piece by piece; I then W in any order after their I gives
B's gradients (float64, 1e-10 relative) and B's input gradients exactly; the reference B is
itself held to PyTorch autograd and finite differences (test_model.py, test_ops.py)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mpigpt2.model.config import GPTConfig
from mpigpt2.model.params import StageSpec, init_params
from mpigpt2.model.stage import Stage

CFG = GPTConfig(max_seq_len=16, vocab_size=37, padded_vocab_size=40, num_layers=3,
                num_heads=2, channels=8)
B, T = 2, 16
SPECS = {"whole": StageSpec(0, 3, True, True), "first": StageSpec(0, 2, True, False),
         "middle": StageSpec(1, 2, False, False), "last": StageSpec(1, 3, False, True)}


def forward_all(spec, M, k, seed=0):
    """A float64 stage with every (micro-batch, slice) forward done; the output gradients
    of a non-last stage are drawn once per unit."""
    stage = Stage(CFG, spec, np.float64)
    init_params(CFG, spec, stage.p, 3)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (M, B, T))
    x_in = rng.standard_normal((M, B * T, CFG.channels))
    douts = {}
    for mb in range(M):
        stage.begin(mb, B, T)
        for j in range(T // k):
            sl = slice(j * k, (j + 1) * k)
            x = tokens[mb, :, sl] if spec.first else \
                np.ascontiguousarray(x_in[mb].reshape(B, T, -1)[:, sl].reshape(B * k, -1))
            out = stage.forward(mb, j * k, x, tokens[mb, :, sl] if spec.last else None,
                                1.0 / (M * B * T))
            if not spec.last:
                douts[mb, j] = rng.standard_normal(out.shape)
    stage.zero_grad()
    return stage, douts


def units(M, n):
    """The backward order of the units: micro-batches in order, slices descending."""
    return [(mb, j) for mb in range(M) for j in reversed(range(n))]


def run_b(spec, M, k):
    stage, douts = forward_all(spec, M, k)
    done = []
    dx = {u: stage.backward(u[0], u[1] * k, douts.get(u), done.append)
          for u in units(M, T // k)}
    return stage.grad_flat.copy(), dx, done


def run_split(spec, M, k, order):
    """All I in backward order; W of each unit at its place in `order` (a permutation of the
    units, each W after its own I: placed after the I at index max(own, position))."""
    stage, douts = forward_all(spec, M, k)
    us = units(M, T // k)
    dx, done = {}, []
    w_after = {}  # index of an I -> the Ws run right after it
    for pos, u in enumerate(order):
        w_after.setdefault(max(us.index(u), pos), []).append(u)
    for i, u in enumerate(us):
        dx[u] = stage.backward_input(u[0], u[1] * k, douts.get(u))
        for w in w_after.get(i, []):
            stage.backward_weight(w[0], w[1] * k, done.append)
    assert not stage.pending  # every W ran and freed what its I kept
    return stage.grad_flat.copy(), dx, done


def close(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max()) < 1e-10


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("M,k", [(1, 16), (2, 4), (2, 1)])
def test_i_then_w_in_order_equals_b(name, M, k):
    g_b, dx_b, done_b = run_b(SPECS[name], M, k)
    g_s, dx_s, done_s = run_split(SPECS[name], M, k, units(M, T // k))
    assert np.array_equal(g_s, g_b)  # the same sums in the same order: bit for bit
    assert all((dx_b[u] is None and dx_s[u] is None) or np.array_equal(dx_b[u], dx_s[u])
               for u in dx_b)
    nl = SPECS[name].l1 - SPECS[name].l0
    assert sorted(done_b) == sorted(done_s) == sorted(list(range(nl)) * M * (T // k))


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(name=st.sampled_from(sorted(SPECS)), shape=st.sampled_from([(2, 4), (3, 2), (1, 1)]),
       data=st.data())
def test_w_in_any_order_after_its_i(name, shape, data):
    """Ws deferred and permuted arbitrarily (as zero-bubble schedules do): the same gradients
    to float64 rounding, the input gradients exactly (I never depends on W)."""
    M, k = shape
    us = units(M, T // k)
    order = data.draw(st.permutations(us))
    g_b, dx_b, _ = run_b(SPECS[name], M, k)
    g_s, dx_s, _ = run_split(SPECS[name], M, k, order)
    assert close(g_s, g_b)
    assert all((dx_b[u] is None and dx_s[u] is None) or np.array_equal(dx_b[u], dx_s[u])
               for u in dx_b)


def test_w_before_its_i_is_impossible():
    stage, _ = forward_all(SPECS["whole"], 1, 16)
    with pytest.raises(KeyError):
        stage.backward_weight(0, 0)

"""zero_grad without a memset (docs/design.md#first-writes): the first write of a step to a
gradient group assigns, later ones accumulate, whatever is never written reads zero. The
result must equal zeroing every gradient and accumulating into it (the step before), for
every kind of stage, micro-batches, token slices, split backward with the Ws in any order
and two chunks (virtual stages) on one rank, whatever the buffers held before."""

import numpy as np
import pytest

from mpigpt2.model.config import GPTConfig
from mpigpt2.model.params import RankSpec, StageSpec, init_params
from mpigpt2.model.stage import Stage

# max_seq_len > T: wpe rows [T, max_seq_len) are never written and must read zero
CFG = GPTConfig(max_seq_len=24, vocab_size=37, padded_vocab_size=40, num_layers=4,
                num_heads=2, channels=8)
B, T = 2, 16
SPECS = {"whole": StageSpec(0, 4, True, True), "first": StageSpec(0, 2, True, False),
         "middle": StageSpec(1, 3, False, False), "last": StageSpec(2, 4, False, True),
         "v-shape": RankSpec((StageSpec(0, 2, True, False), StageSpec(2, 4, False, True)))}


def make_stage(spec):
    stage = Stage(CFG, spec, np.float64)
    init_params(CFG, spec, stage.p, 5)
    return stage


def forward_all(stage, M, k, rng):
    """Every (micro-batch, slice, chunk) forward; returns the backward units, in order, with
    the output gradient each needs (None on the last chunk)."""
    tokens = rng.integers(0, CFG.vocab_size, (M, B, T))
    units = []
    for mb in range(M):
        for c in range(len(stage.chunks)):
            stage.begin(mb, B, T, c)
        for pos0 in range(0, T, k):
            x = tokens[mb, :, pos0:pos0 + k]
            if not stage.chunks[0].first:
                x = rng.standard_normal((B * k, CFG.channels))
            for c, spec in enumerate(stage.chunks):
                x = stage.forward(mb, pos0, x, tokens[mb, :, pos0:pos0 + k] if spec.last
                                  else None, 1.0 / (M * B * T), c=c)
            units.append((mb, pos0, None if stage.chunks[-1].last
                          else rng.standard_normal(x.shape)))
    return [u for mb in range(M) for u in reversed([v for v in units if v[0] == mb])]


def step(spec, M, k, split, order_seed, reference):
    """One step's gradients after garbage in the buffers; reference: the semantics before
    first writes (a memset, then every write accumulates)."""
    stage = make_stage(spec)
    stage.grad_flat[...] = np.nan
    rng = np.random.default_rng(1)
    units = forward_all(stage, M, k, rng)
    stage.zero_grad()
    if reference:
        stage._accumulate = lambda key: True
        stage.grad_flat[...] = 0.0
    ws = []
    for mb, pos0, dout in units:
        for c in reversed(range(len(stage.chunks))):
            if split:
                dout = stage.backward_input(mb, pos0, dout, c=c)
                ws.append((mb, pos0, c))
            else:
                dout = stage.backward(mb, pos0, dout, c=c)
    for i in np.random.default_rng(order_seed).permutation(len(ws)):
        stage.backward_weight(ws[i][0], ws[i][1], c=ws[i][2])
    return stage


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("M,k,split", [(1, 16, False), (2, 4, False), (2, 8, True),
                                       (1, 4, True)])
def test_first_writes_equal_zero_then_accumulate(name, M, k, split):
    got = step(SPECS[name], M, k, split, 7, reference=False)
    ref = step(SPECS[name], M, k, split, 7, reference=True)
    assert np.isfinite(ref.grad_flat).all()
    np.testing.assert_array_equal(got.grad_flat, ref.grad_flat)
    if "wpe" in got.g:
        assert not got.g["wpe"][T:].any()  # positions never seen: zero, not the old NaN


def test_unwritten_gradients_read_zero():
    stage = make_stage(SPECS["whole"])
    stage.grad_flat[...] = 1.0
    stage.zero_grad()
    assert not stage.g["qkvw"].any() and not stage.grad_flat.any()


def test_without_zero_grad_backward_accumulates():
    """Two backwards of the same data without zero_grad in between: twice the gradient."""
    one = step(SPECS["whole"], 1, 8, False, 0, reference=False)
    two = make_stage(SPECS["whole"])
    two.grad_flat[...] = 0.0
    for _ in range(2):
        for mb, pos0, dout in forward_all(two, 1, 8, np.random.default_rng(1)):
            two.backward(mb, pos0, dout)
    np.testing.assert_allclose(two.grad_flat, 2 * one.grad_flat, rtol=1e-12, atol=1e-15)

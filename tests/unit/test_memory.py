"""The memory estimate (issue 12.5) against what a training step really allocates: numpy
reports its buffers to tracemalloc, so the peak of one real train_step (one process, the
trainer's own Stage, Runner and optimizer) is measured, not assumed. The estimate must cover
it and stay within a factor of it."""

import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from mpigpt2.model.config import preset
from mpigpt2.model.params import init_params
from mpigpt2.model.stage import Stage
from mpigpt2.parallel import memory as mem, schedule as sch
from mpigpt2.parallel.grid import make_grid
from mpigpt2.parallel.layout import resolve
from mpigpt2.parallel.optimizer import make_optimizer
from mpigpt2.parallel.runtime import Runner
from mpigpt2.parallel.step import train_step


def test_in_flight_counts_units_and_micro_batches():
    """GPipe keeps every unit of a step alive on stage 0; 1F1B at most pp of them."""
    gpipe = sch.build("gpipe", 2, 2, 2)
    assert mem.in_flight(gpipe[0]) == (4, 2)
    assert mem.in_flight(gpipe[1]) == (4, 2)
    one = sch.build("1f1b", 2, 4, 1)
    assert mem.in_flight(one[0]) == (2, 2) and mem.in_flight(one[1]) == (1, 1)


def measured_peak(cfg, lay, B, T, dtype, zero=0):
    """tracemalloc's peak over building the stage, optimizer, runner and two train steps."""
    tracemalloc.start()
    try:
        grid = make_grid(MPI.COMM_SELF, 1, 1)
        stage = Stage(cfg, lay.spec(0), dtype)
        init_params(cfg, stage.spec, stage.p, 0)
        opt = make_optimizer(grid, stage, zero)
        M = lay.microbatches
        runner = Runner(grid, stage, lay, T, B // M, reducer=opt.reducer)
        rng = np.random.default_rng(0)
        x = rng.integers(0, cfg.vocab_size, (M, B // M, T))
        y = rng.integers(0, cfg.vocab_size, (M, B // M, T))
        for t in (1, 2):
            train_step(runner, opt, x, y, t, 1e-3, 1.0 / (B * T), norm=True)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("B,T,M,k,dtype", [
    (4, 64, 1, 64, np.float32), (8, 64, 2, 64, np.float32), (4, 64, 1, 16, np.float32),
    (8, 128, 4, 32, np.float32), (4, 64, 2, 8, np.float64), (16, 32, 1, 32, np.float32),
])
def test_estimate_covers_a_real_step(B, T, M, k, dtype):
    cfg = preset("gpt2-tiny")
    lay = resolve(1, cfg, B, T, pp=1, microbatches=M, slice_tokens=k, schedule="gpipe")
    peak = measured_peak(cfg, lay, B, T, dtype)
    est = mem.rank_estimate(cfg, lay, 0, B, T, np.dtype(dtype).itemsize, 0)
    assert est.checkpoint == 0  # (not rank 0's checkpoint gather: that is not measured here)
    need = est.state + est.activations
    assert peak <= need <= 1.5 * peak, (peak / 2**20, need / 2**20)

"""Parity matrix: every parallel layout trains to the same losses and weights as one process.

float64 compares losses, the first step's gradients and final parameters (relative 1e-10).
float32 compares losses and the first step's gradients (relative 1e-5), and the final
parameters in units of Adam's largest possible move (lr per step): Adam divides by sqrt(v),
so a gradient near zero turns float32 rounding noise into a visible step, and the final
parameters can differ by more than 1e-5 relative by design, not by error (measured: 7e-5 of
attprojw's largest entry, 1e-3 of lr·steps). The key bias is left out of that check: its
gradient is exactly zero in exact arithmetic (softmax ignores a constant added to every
score), so each step is ±lr with the sign of float32 noise.

Run under MPI: `mpiexec -n 8 python -m pytest --with-mpi tests/mpi`. Each case takes the first
pp·dp ranks of the world; the verdict is agreed by all ranks so none fails alone.
"""

import numpy as np
import pytest
from mpi4py import MPI

from mpigpt2.parallel.collectives import gather_model
from mpigpt2.model.config import GPTConfig
from mpigpt2.parallel.grid import make_grid
from mpigpt2.parallel.layout import resolve
from mpigpt2.model.gpt import GPT
from mpigpt2.model.optim import AdamW
from mpigpt2.model.params import init_params
from mpigpt2.parallel.runtime import Runner
from mpigpt2.model.stage import Stage
from mpigpt2.parallel.zero import ShardedAdam
from tolerances import PARITY_F32, PARITY_F32_ADAM, PARITY_F64

CFG = GPTConfig(max_seq_len=32, vocab_size=61, padded_vocab_size=64, num_layers=4,
                num_heads=2, channels=16)
B, T, STEPS, LR, SEED = 24, 32, 3, 1e-3, 7  # B divisible by every dp·M below


def batch(step):
    rng = np.random.default_rng([SEED, step])
    w = rng.integers(0, CFG.vocab_size, B * T + 1)
    return w[:-1].reshape(B, T), w[1:].reshape(B, T)


def reference(dtype):
    """One process, whole batch, no slicing."""
    m = GPT(CFG, dtype=dtype, seed=SEED)
    opt = AdamW(m.flat.size, dtype)
    losses, grads = [], None
    for step in range(STEPS):
        x, y = batch(step)
        m.zero_grad()
        losses.append(m.forward(x, y))
        m.backward()
        if grads is None:
            grads = {n: g.copy() for n, g in m.grads.items()}
        opt.step(m.flat, m.grad_flat, step + 1, LR)
    return losses, m.params, grads


def train_layout(comm, lay, dtype, zero=0, overlap=True):
    """The training loop of mpigpt2.train on a sub-communicator, with in-memory data."""
    grid = make_grid(comm, lay.pp, lay.dp)
    stage = Stage(CFG, lay.spec(grid.stage), dtype)
    init_params(CFG, stage.spec, stage.p, SEED)
    if zero:
        opt = ShardedAdam(grid, stage)
        stage.before_use = opt.wait_param
    else:
        opt = AdamW(stage.layout.size, dtype)
    M = lay.microbatches
    rows = B // lay.dp
    runner = Runner(grid, stage, lay, T, rows // M, reducer=opt if zero else None,
                    overlap=overlap)
    losses, grads, sumsq = [], None, None
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(grid.replica * rows, (grid.replica + 1) * rows)
        x, y = x[mine].reshape(M, -1, T), y[mine].reshape(M, -1, T)
        stage.zero_grad()
        loss = runner.run(x, y, 1.0 / (B * T))
        if step == 0:
            grads = gather_model(grid, stage, lay, grads=True)
            if zero:  # the reduced gradient lives in the shards: assemble it for the check
                grads = gather_model(grid, stage, lay, flat=opt.full_grad())
                sumsq = comm.allreduce(opt.grad_sumsq())  # what --grad-clip uses
        if zero:
            opt.step(step + 1, LR, overlap=overlap)
        else:
            opt.step(stage.flat, stage.grad_flat, step + 1, LR)
        losses.append(comm.allreduce(loss) / (B * T))
    if zero:
        opt.sync()
    wtes = comm.allgather(stage.p["wte"].copy() if "wte" in stage.p else None)
    tied_equal = all(np.array_equal(w, wtes[0]) for w in wtes if w is not None)
    return losses, gather_model(grid, stage, lay), grads, tied_equal, sumsq


# (pp, dp, k, M, schedule, stage_layers[, zero, overlap]): every value of the issue's
# matrix appears (k = T, T/4, T/16, 1 with T = 32); the last rows run ZeRO-1 with and
# without overlap
CASES = [
    (1, 1, 32, 1, "gpipe", None),
    (1, 2, 1, 4, "1f1b", None),
    (1, 4, 8, 2, "gpipe", None),
    (2, 1, 8, 2, "1f1b", None),
    (2, 1, 2, 1, "gpipe", "3,1"),
    (2, 2, 1, 2, "gpipe", "1,3"),
    (2, 4, 32, 1, "gpipe", None),
    (3, 1, 8, 4, "1f1b", "2,1,1"),
    (3, 2, 32, 4, "1f1b", "1,2,1"),
    (4, 1, 1, 4, "1f1b", None),
    (4, 2, 8, 4, "1f1b", None),
    (4, 2, 2, 1, "gpipe", None),
    (2, 2, 2, 4, "1f1b", "2,2"),
    (1, 2, 32, 1, "gpipe", None, 1, True),
    (1, 4, 8, 2, "1f1b", None, 1, False),
    (2, 2, 8, 2, "1f1b", "3,1", 1, True),
    (2, 4, 1, 1, "gpipe", None, 1, False),
    (1, 3, 32, 1, "gpipe", None, 1, True),  # shards of unequal size
    (3, 2, 8, 4, "1f1b", "1,2,1", 1, True),  # a middle stage without wte
    (3, 1, 2, 4, "1f1b", "2,1,1", 1, False),  # wte's state split over its two stages only
    (2, 3, 32, 1, "gpipe", "3,1", 1, False),  # unequal shards of wte (6 owners) and the rest
    (2, 3, 8, 2, "gpipe", "1,3", 1, True),
    (4, 2, 2, 4, "1f1b", None, 1, True),
]

_REF = {}


@pytest.mark.mpi(min_size=8)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pp,dp,k,M,sched,split,zero,overlap",
                         [c if len(c) == 8 else c + (0, True) for c in CASES],
                         ids=[f"pp{c[0]}-dp{c[1]}-k{c[2]}-M{c[3]}-{c[4]}"
                              + (f"-{c[5]}" if c[5] else "")
                              + (f"-zero1{'' if c[7] else '-no-overlap'}" if c[6:] else "")
                              for c in CASES])
def test_parity(pp, dp, k, M, sched, split, dtype, zero, overlap):
    world = MPI.COMM_WORLD
    lay = resolve(pp * dp, CFG, B, T, pp, dp, split, M, k, sched)
    inside = world.Get_rank() < pp * dp
    comm = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    verdict = None
    if inside:
        losses, params, grads, tied_equal, sumsq = train_layout(comm, lay, dtype, zero, overlap)
        comm.Free()
        if world.Get_rank() == 0:
            if dtype not in _REF:
                _REF[dtype] = reference(dtype)
            ref_losses, ref_params, ref_grads = _REF[dtype]
            tol = PARITY_F64 if dtype == np.float64 else PARITY_F32
            errs = {"loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))}
            adam_errs = {}  # float32 final parameters, in units of lr·steps
            for n in ref_params:
                errs["d" + n] = float(np.abs(grads[n] - ref_grads[n]).max()
                                      / np.abs(ref_grads[n]).max())
                got, want = params[n], ref_params[n]
                if dtype == np.float64:
                    errs[n] = float(np.abs(got - want).max() / np.abs(want).max())
                    continue
                if n == "qkvb":  # drop the key bias (see the module docstring)
                    C = CFG.channels
                    got, want = (np.delete(a, np.s_[C:2 * C], 1) for a in (got, want))
                # Adam moves a parameter by at most ≈ lr per step: measure in that unit
                adam_errs[n] = float(np.abs(got - want).max()) / (LR * STEPS)
            if sumsq is not None:  # ZeRO's gradient norm counts the tied wte once
                want = sum(float((g.astype(np.float64) ** 2).sum()) for g in ref_grads.values())
                errs["grad_sumsq"] = abs(sumsq - want) / want
            bad = {n: e for n, e in errs.items() if not e <= tol}
            bad.update({n + " (÷ lr·steps)": e for n, e in adam_errs.items()
                        if not e <= PARITY_F32_ADAM})
            if bad or not tied_equal:
                verdict = f"relative errors over {tol}: {bad}; tied wte equal: {tied_equal}"
    verdict = world.bcast(verdict, root=0)
    assert verdict is None, verdict

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

import os
import tempfile
import tracemalloc

import numpy as np
import pytest
from mpi4py import MPI

from mpigpt2.model.config import GPTConfig
from mpigpt2.model.gpt import GPT
from mpigpt2.model.optim import AdamW, clip_scale
from mpigpt2.model.params import init_params
from mpigpt2.model.stage import Stage
from mpigpt2.parallel.collectives import gather_model
from mpigpt2.parallel.grid import make_grid
from mpigpt2.parallel.memory import rank_estimate
from mpigpt2.parallel.layout import resolve
from mpigpt2.parallel.optimizer import make_optimizer
from mpigpt2.parallel.runtime import Runner
from mpigpt2.parallel.step import train_step
from tolerances import PARITY_F32, PARITY_F32_ADAM, PARITY_F64

CFG = GPTConfig(max_seq_len=32, vocab_size=61, padded_vocab_size=64, num_layers=4,
                num_heads=2, channels=16)
B, T, STEPS, LR, SEED = 24, 32, 3, 1e-3, 7  # B divisible by every dp·M below
CLIP = 0.05  # below every step's gradient norm (asserted), so clipping acts on each step


def batch(step):
    rng = np.random.default_rng([SEED, step])
    w = rng.integers(0, CFG.vocab_size, B * T + 1)
    return w[:-1].reshape(B, T), w[1:].reshape(B, T)


def reference(dtype, clip=0.0):
    """One process, whole batch, no slicing; global-norm clipping computed here from the
    whole model's gradient (float64 sum of squares)."""
    m = GPT(CFG, dtype=dtype, seed=SEED)
    opt = AdamW(m.flat.size, dtype)
    losses, grads, norms = [], None, []
    for step in range(STEPS):
        x, y = batch(step)
        m.zero_grad()
        losses.append(m.forward(x, y))
        m.backward()
        if grads is None:
            grads = {n: g.copy() for n, g in m.grads.items()}
        norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum())
                                 for g in m.grads.values())))
        norms.append(norm)
        opt.step(m.flat, m.grad_flat, step + 1, LR, clip_scale(norm, clip) if clip else 1.0)
    return losses, m.params, grads, norms


def replicas_on_node(lay, rank, opts):
    """How many ranks of `rank`'s stage share its (emulated) node's one copy: every replica
    with +shared, those among the node's four ranks with +shared4, 1 otherwise."""
    if not {"shared", "shared4"} & set(opts):
        return 1
    first = rank // 4 * 4
    node = range(lay.pp * lay.dp) if "shared" in opts else range(first, first + 4)
    return sum(lay.coords(r)[0] == lay.coords(rank)[0] for r in node)


def train_layout(comm, lay, dtype, zero=0, overlap=True, clip=0.0, opts=()):
    """The trainer's own step (parallel.step.train_step) on a sub-communicator, in-memory data.
    opts: hier (hierarchical gradient reduction over emulated nodes of two ranks each),
    shared (node-shared data parallelism on this node), shared4 (the same over emulated
    nodes of four ranks each)."""
    grid = make_grid(comm, lay.pp, lay.dp, wte_ranks=lay.wte_ranks, order=lay.rank_order)
    stage = Stage(CFG, lay.rank_spec(grid.stage), dtype)
    opt = make_optimizer(grid, stage, zero, overlap=overlap, hierarchical="hier" in opts,
                         node_id=(comm.Get_rank() // 4 if "shared4" in opts else
                                  None if "shared" in opts else comm.Get_rank() // 2),
                         shared=bool({"shared", "shared4"} & set(opts)))
    init_params(CFG, stage.spec, stage.p, SEED)
    opt.loaded()
    M = lay.microbatches
    rows = B // lay.dp
    runner = Runner(grid, stage, lay, T, rows // M, reducer=opt.reducer, overlap=overlap)
    losses, grads, norms = [], None, []
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(grid.replica * rows, (grid.replica + 1) * rows)
        x, y = x[mine].reshape(M, -1, T), y[mine].reshape(M, -1, T)
        if step == 0:  # probe: the first step's reduced gradient, the update switched off
            update, opt.step = opt.step, lambda *a: None
            train_step(runner, opt, x, y, step + 1, LR, 1.0 / (B * T))
            opt.step = update
            grads = gather_model(grid, stage, lay, grads=True)
            if hasattr(opt, "full_grad"):  # ZeRO's shards, or the shared sum: assemble it
                grads = gather_model(grid, stage, lay, flat=opt.full_grad())
        result = train_step(runner, opt, x, y, step + 1, LR, 1.0 / (B * T), grad_clip=clip,
                            norm=True)
        losses.append(comm.allreduce(result.loss_sum) / (B * T))
        norms.append(result.grad_norm)
    opt.sync()
    wtes = comm.allgather(stage.p["wte"].copy() if "wte" in stage.p else None)
    tied_equal = all(np.array_equal(w, wtes[0]) for w in wtes if w is not None)
    return losses, gather_model(grid, stage, lay), grads, tied_equal, norms


# (pp, dp, k, M, schedule, stage_layers[, zero, overlap[, clip]]): every value of the issue's
# matrix appears (k = T, T/4, T/16, 1 with T = 32); the later rows run ZeRO-1 with and
# without overlap; rows with a clip run --grad-clip below the gradient norm (active every step)
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
    (2, 2, 8, 2, "1f1b", None, 0, True, CLIP),  # clipping at pp > 1 without ZeRO: wte once
    (3, 1, 2, 2, "gpipe", "1,2,1", 0, True, CLIP),
    (2, 3, 8, 2, "1f1b", "3,1", 1, True, CLIP),
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
    (4, 1, 8, 2, "1f1b", None),  # 1F1B with M < pp: the warm-up clamped to M·n units
    (4, 2, 32, 1, "1f1b", None),
    (3, 2, 1, 2, "1f1b", "2,1,1", 1, True),
    (2, 1, 8, 2, "zb-h1", None),  # the split backward: I and W, Ws deferred into the bubble
    (2, 2, 32, 1, "zb-h1", "3,1"),
    (4, 1, 1, 4, "zb-h1", None),
    (2, 2, 8, 2, "zb-h1", None, 1, True),
    (3, 2, 1, 2, "zb-h1", "1,2,1", 1, False),
    (2, 2, 8, 2, "zb-h1", None, 0, True, CLIP),
    (2, 1, 8, 2, "torch:ScheduleInterleavedZeroBubble", None),  # files written by torch
    (2, 2, 1, 2, "torch:ScheduleInterleaved1F1B", "3,1", 1, True),
    # virtual stages (name@v; zb-v is v = 2 in the V placement): interleaved, zb-v, looped
    (2, 1, 32, 2, "interleaved-1f1b@2", None),
    (2, 2, 8, 2, "interleaved-1f1b@2", None),
    (2, 1, 1, 1, "interleaved-1f1b@2", None),
    (1, 2, 8, 2, "interleaved-1f1b@2", "3,1"),  # uneven chunks, both on one rank: hand-offs
    (2, 2, 8, 2, "interleaved-1f1b@2", None, 1, True),
    (2, 3, 2, 2, "interleaved-1f1b@2", None, 1, False),
    (2, 1, 32, 2, "zb-v", None),
    (2, 2, 8, 1, "zb-v", None),
    (2, 1, 1, 2, "zb-v", None),
    (1, 2, 8, 2, "zb-v", "1,3"),
    (2, 2, 8, 2, "zb-v", None, 1, False),
    (2, 2, 2, 2, "zb-v", None, 1, True, CLIP),  # wte of the first and last stage on one rank
    (2, 1, 8, 2, "zb-h1@2", None),  # interleaved zero bubble
    (2, 2, 8, 2, "looped-bfs@2", None),
    (1, 1, 8, 2, "looped-bfs@4", None),
    (2, 1, 8, 4, "torch:ScheduleZBVZeroBubble", None),  # torch's files, two stages per rank
    (2, 2, 8, 4, "torch:ScheduleDualPipeV", None),
    (2, 1, 8, 4, "torch:ScheduleInterleaved1F1B@2", None, 1, True),
    # non-uniform slices (explicit lengths summing to T = 32; Seq1F1B's later-is-dearer)
    (2, 1, (12, 8, 6, 6), 2, "1f1b", None),
    (2, 2, (20, 12), 1, "zb-h1", "3,1", 1, True),
    (2, 1, (16, 8, 5, 3), 2, "interleaved-1f1b@2", None),
    (2, 2, (1, 30, 1), 2, "zb-v", None, 1, False, CLIP),
    (1, 2, (24, 8), 2, "gpipe", None),
    # the "data" rank order (a stage's replicas on neighbouring ranks: name+data)
    (2, 2, 8, 2, "1f1b+data", None),
    (2, 3, 8, 2, "zb-h1+data", "3,1", 1, True),
    (2, 2, 1, 2, "zb-v+data", None, 1, False),
    (4, 2, 8, 4, "1f1b+data", None, 0, True, CLIP),
    # hierarchical gradient reduction over emulated nodes of two ranks (+hier)
    (1, 4, 8, 2, "1f1b+hier", None),
    (2, 4, 8, 2, "zb-h1+data+hier", None),
    (2, 3, 8, 2, "1f1b+hier", "3,1", 0, True, CLIP),
    # node-shared data parallelism on this node (+shared) and over emulated nodes of four
    # ranks (+shared4: in place inside a node, allreduced by slice between nodes)
    (1, 8, 32, 1, "gpipe+shared", None),
    (1, 4, 8, 2, "1f1b+shared", None, 0, False, CLIP),
    (2, 4, 8, 2, "zb-h1+shared", "3,1"),
    (2, 3, 2, 2, "1f1b+data+shared", None, 0, True, CLIP),
    (2, 2, 8, 2, "zb-v+shared", None),
    (1, 8, 8, 1, "1f1b+shared4", None, 0, True, CLIP),
    (2, 4, 8, 2, "interleaved-1f1b@2+data+shared4", None),
    (2, 4, 1, 2, "zb-h1+shared4", "1,3", 0, False),
]

_REF = {}


def _k(k):
    return "_".join(map(str, k)) if isinstance(k, tuple) else k


def case(c):
    return c + (0, True, 0.0)[len(c) - 6:]


@pytest.mark.mpi(min_size=8)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pp,dp,k,M,sched,split,zero,overlap,clip", [case(c) for c in CASES],
                         ids=[f"pp{c[0]}-dp{c[1]}-k{_k(c[2])}-M{c[3]}-{c[4]}"
                              + (f"-{c[5]}" if c[5] else "")
                              + (f"-zero1{'' if c[7] else '-no-overlap'}" if c[6] else "")
                              + ("-clip" if c[8] else "")
                              for c in map(case, CASES)])
def test_parity(pp, dp, k, M, sched, split, dtype, zero, overlap, clip):
    world = MPI.COMM_WORLD
    sched, *opts = sched.split("+")  # +data: the data rank order; +hier: hierarchical
    order = "data" if "data" in opts else None
    sched, _, v = sched.partition("@")  # name@v: v virtual stages per rank
    v = int(v) if v else (2 if sched.endswith(("zb-v", "ZBVZeroBubble", "DualPipeV")) else 1)
    if sched.startswith("torch:"):  # a schedule file from torch's own builder, one per rank
        from helpers_torch_schedules import torch_schedule_csv
        sched = str(torch_schedule_csv(os.path.join(tempfile.gettempdir(), f"mpigpt2-parity-"
                                                    f"{os.getpid()}.csv"), sched[6:], pp, M, v))
    lay = resolve(pp * dp, CFG, B, T, pp, dp, split, M, k, sched, virtual_stages=v,
                  rank_order=order or "pipe")
    inside = world.Get_rank() < pp * dp
    comm = world.Split(0 if inside else MPI.UNDEFINED, world.Get_rank())
    verdict, memory = None, None
    if inside:
        measure = dtype == np.float32  # (tracing costs time: the float32 rows suffice)
        if measure:
            tracemalloc.start()  # numpy reports its buffers: the real peak, for the estimate
        losses, params, grads, tied_equal, norms = train_layout(comm, lay, dtype, zero, overlap,
                                                                clip, opts)
        if measure:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            est = rank_estimate(CFG, lay, lay.coords(comm.Get_rank())[0], B, T, 4, zero,
                                rank0=comm.Get_rank() == 0,
                                shared_n=replicas_on_node(lay, comm.Get_rank(), opts))
            memory = (world.Get_rank(), peak, est.total)
        comm.Free()
    if sched.endswith(".csv"):
        os.remove(sched)  # (the per-rank file written above: nothing left in /tmp)
    if inside:
        if world.Get_rank() == 0:
            if (dtype, clip) not in _REF:
                _REF[dtype, clip] = reference(dtype, clip)
            ref_losses, ref_params, ref_grads, ref_norms = _REF[dtype, clip]
            assert not clip or min(ref_norms) > clip, "the clip must be active in every step"
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
            # the trainer's gradient norm (what --grad-clip scales by) counts the tied wte once
            errs["grad_norm"] = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
            bad = {n: e for n, e in errs.items() if not e <= tol}
            bad.update({n + " (÷ lr·steps)": e for n, e in adam_errs.items()
                        if not e <= PARITY_F32_ADAM})
            if bad or not tied_equal:
                verdict = f"relative errors over {tol}: {bad}; tied wte equal: {tied_equal}"
    over = [m for m in world.gather(memory, root=0) or [] if m and m[1] > m[2]]
    if world.Get_rank() == 0 and over and verdict is None:
        verdict = f"memory estimate below the measured peak (rank, peak, estimate): {over}"
    verdict = world.bcast(verdict, root=0)
    assert verdict is None, verdict

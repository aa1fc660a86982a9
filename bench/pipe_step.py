"""Rows 3-5: timed training steps of the MPI runtime, built as mpigpt2.train builds it.

    mpiexec -n 2 python bench/pipe_step.py --pp 2 --dp 1 --B 8 --T 256 --ks 256,128,32
    mpiexec -n 2 python bench/pipe_step.py --pp 1 --dp 2 --B 16 --T 256 --ks 256
    mpiexec -n 2 python bench/pipe_step.py --pp 2 --M 8 --schedule gpipe --track-activations

A model shape given by flags (no preset needed), random tokens (seeded), one BLAS thread per
rank. For each k of --ks a Runner is built over the same stage and optimizer; rounds of one
step per k follow (warm-up rounds untimed), each step (the trainer's own
parallel.step.train_step, then the loss reduction) timed between two polled barriers. Rank 0 prints one BENCH_JSON line per k with the step times and, per rank,
the compute seconds, the polled waiting seconds, peak activation bytes and peak RSS.
"""

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, summary  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--L", type=int, default=8, help="layers")
    a("--NH", type=int, default=8, help="heads")
    a("--C", type=int, default=512, help="channels")
    a("--V", type=int, default=8192, help="vocabulary (padded to a multiple of 128)")
    a("--B", type=int, default=8, help="global batch (sequences per step, all replicas)")
    a("--T", type=int, default=256, help="sequence length (also maxT)")
    a("--pp", type=int, default=2, help="pipeline stages")
    a("--dp", type=int, default=1, help="data-parallel replicas")
    a("--M", type=int, default=1, help="micro-batches per replica")
    a("--schedule", choices=("gpipe", "1f1b"), default=None, help="default: the layout's rule")
    a("--stage-layers", default=None, help="layers per stage, e.g. 5,3 (default: balanced)")
    a("--ks", default=None, help="comma-separated slice lengths k (default: T)")
    a("--warmup", type=int, default=1, help="untimed rounds (one step per k each)")
    a("--steps", type=int, default=3, help="timed rounds (one step per k each)")
    a("--track-activations", action="store_true",
      help="measure the bytes of activations and KV caches held after every forward")
    a("--label", default="", help="copied into the output lines")
    return ap.parse_args()


def _arrays(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _arrays(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _arrays(o)


def held_bytes(stage):
    """Bytes of every micro-batch's KV cache, dK/dV accumulators and saved slice activations
    (each underlying buffer counted once)."""
    seen, total = set(), 0
    for st in stage.mbs.values():
        for a in _arrays([st.k, st.v, st.dk, st.dv, st.saved]):
            while a.base is not None and isinstance(a.base, np.ndarray):
                a = a.base
            if id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
    return total


def track_activations(stage, peak):
    """Wrap the stage's forward so peak["bytes"] follows the activations held."""
    forward = stage.forward

    def wrapped(*a, **kw):
        out = forward(*a, **kw)
        peak["bytes"] = max(peak["bytes"], held_bytes(stage))
        return out

    stage.forward = wrapped


def main():
    args = parse_args()
    from mpigpt2.base.malloc import tune
    tune()  # as mpigpt2.train does
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits
    from mpigpt2.parallel import layout as lay
    from mpigpt2.parallel.collectives import barrier, sum_to_root
    from mpigpt2.model.config import GPTConfig, pad_vocab
    from mpigpt2.parallel.failure import install_excepthook
    from mpigpt2.parallel.grid import make_grid
    from mpigpt2.model.params import init_params
    from mpigpt2.parallel.optimizer import make_optimizer
    from mpigpt2.parallel.runtime import Runner
    from mpigpt2.parallel.step import train_step
    from mpigpt2.model.stage import Stage

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    install_excepthook(world)
    threadpool_limits(1, user_api="blas")
    B, T = args.B, args.T
    cfg = GPTConfig(max_seq_len=T, vocab_size=args.V, padded_vocab_size=pad_vocab(args.V),
                    num_layers=args.L, num_heads=args.NH, channels=args.C)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else [T]
    layouts = [lay.resolve(size, cfg, B, T, args.pp, args.dp, args.stage_layers, args.M, k,
                           args.schedule) for k in ks]
    grid = make_grid(world, args.pp, args.dp, wte_ranks=layouts[0].wte_ranks)
    spec = layouts[0].rank_spec(grid.stage)
    stage = Stage(cfg, spec, np.float32)
    init_params(cfg, spec, stage.p, seed=0)
    opt = make_optimizer(grid, stage)
    M = args.M
    rows = B // args.dp
    b = rows // M
    toks = np.random.default_rng(1234).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    mine = toks[grid.replica * rows:(grid.replica + 1) * rows]
    x = np.ascontiguousarray(mine[:, :-1]).reshape(M, b, T)
    y = np.ascontiguousarray(mine[:, 1:]).reshape(M, b, T)
    dloss = 1.0 / (B * T)
    peak = {"bytes": 0}
    if args.track_activations:
        track_activations(stage, peak)

    runners = [Runner(grid, stage, layout, T, b, reducer=opt.reducer) for layout in layouts]
    acc = [{"times": [], "losses": [], "forward": 0.0, "backward": 0.0, "waits": {},
            "peak": 0, "cpu": 0.0, "wall": 0.0} for _ in layouts]
    t = 0
    # round-robin over the k values, one step each, so that a burst of other load on a shared
    # machine hits every k alike; round 0..warmup-1 is untimed
    for rnd in range(args.warmup + args.steps):
        for runner, a in zip(runners, acc):
            peak["bytes"] = 0
            t += 1
            barrier(world)
            t0, c0 = time.perf_counter(), time.process_time()
            result = train_step(runner, opt, x, y, t, 1e-4, dloss)
            loss = sum_to_root(world, [result.loss_sum], grid.waiter)[0] / (B * T)
            barrier(world, grid.waiter)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            comp, waits = result.times, result.waits
            a["losses"].append(float(loss))
            if rnd < args.warmup:
                continue
            a["times"].append(dt)
            a["cpu"] += dc
            a["wall"] += dt
            a["forward"] += comp.get("forward", 0.0)
            a["backward"] += comp.get("backward", 0.0)
            for kind, sec in waits.items():
                a["waits"][kind] = a["waits"].get(kind, 0.0) + sec
            a["peak"] = max(a["peak"], peak["bytes"])
    for layout, runner, a in zip(layouts, runners, acc):
        times = a["times"]
        p2p_bytes = sum(v.nbytes for v in runner.p2p.buf.values() if v is not None)
        per_rank = world.gather({
            "rank": rank, "stage": grid.stage, "replica": grid.replica,
            "layers": spec.l1 - spec.l0,
            "forward_s_per_step": a["forward"] / args.steps,
            "backward_s_per_step": a["backward"] / args.steps,
            "wait_s_per_step": {k: v / args.steps for k, v in a["waits"].items()},
            # CPU seconds this rank got per wall second of its steps: < 1 when it waited for
            # messages (sleeping) or was descheduled by other load
            "cpu_per_wall": a["cpu"] / a["wall"] if a["wall"] else None,
            "param_bytes": int(stage.flat.nbytes),
            "state_bytes": int(stage.flat.nbytes + stage.grad_flat.nbytes + opt.nbytes),
            "p2p_buffer_bytes": int(p2p_bytes),
            "peak_activation_bytes": int(a["peak"]) if args.track_activations else None,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }, root=0)
        if rank == 0:
            emit({"kind": "pipe", "label": args.label, "world": size,
                  "model": {"L": cfg.num_layers, "NH": cfg.num_heads, "C": cfg.channels,
                            "V": cfg.vocab_size, "Vp": cfg.padded_vocab_size, "maxT": T},
                  "B": B, "T": T, "layout": layout.as_dict(), "k": layout.slice_tokens,
                  "n_slices": layout.n_slices(T), "warmup": args.warmup,
                  **summary(times), "tokens_per_s_best": B * T / min(times),
                  "tokens_per_s_median": B * T / float(np.median(times)),
                  "losses": a["losses"], "ranks": per_rank, "loadavg_end": os.getloadavg()})
    barrier(world)


if __name__ == "__main__":
    main()

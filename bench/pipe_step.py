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

import mpigpt2  # noqa: F401 - first: numpy's BLAS kernels as the trainer picks them
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
    a("--schedule", default=None, help="any --schedule of mpigpt2.train (default: the "
      "layout's rule)")
    a("--virtual-stages", type=int, default=None, help="stages per rank (as mpigpt2.train)")
    a("--stage-layers", default=None, help="layers per stage, e.g. 5,3 (default: balanced)")
    a("--ks", default=None, help="comma-separated slice lengths k (default: T), one run each")
    a("--warmup", type=int, default=1, help="untimed rounds (one step per k each)")
    a("--steps", type=int, default=3, help="timed rounds (one step per k each)")
    a("--track-activations", action="store_true",
      help="measure the bytes of activations and KV caches held after every forward")
    a("--label", default="", help="copied into the output lines")
    a("--variant", action="append", default=None, metavar="SCHED[@V][:LAYERS]",
      help="time this schedule (V stages per rank, LAYERS per stage) too, step by step in turn "
      "with the others (repeatable; replaces --schedule/--virtual-stages/--stage-layers)")
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


def prediction(layout, T, per_rank, times):
    """The schedule simulated, step by step, with that step's measured compute seconds
    (replica 0), against the measured pipelined part of the same step: its span (the slowest
    rank's start of the schedule to its last compute) and bubble (1 − work / (pp · span));
    the predicted step adds the step's measured rest (the reduction's tail, the update, the
    loss and barriers), which the simulator does not model."""
    from mpigpt2.parallel import costs
    from mpigpt2.parallel.schedule import COMPUTE
    progs, pp = layout.programs(T), layout.pp
    acts = [[a for a in progs[r["stage"]] if a.kind in COMPUTE] for r in per_rank[:pp]]
    rows = []
    for i, t in enumerate(times):
        seconds = {}
        for r, mine in zip(per_rank[:pp], acts):
            seconds.update(zip(mine, r["action_s_steps"][i]))
        _, end, bubble = costs.measured_pipeline(progs, seconds)
        span = max(r["pipeline_s_per_step"][i] for r in per_rank[:pp])
        work = sum(seconds.values())
        rows.append({"step_s": t, "pipeline_s": span, "pipeline_predicted_s": end,
                     "bubble": 1 - work / (pp * span), "bubble_predicted": bubble,
                     "step_predicted_s": end + t - span})
    med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
    return {"per_step": rows, **{k + "_median": v for k, v in med.items()},
            "pipeline_error_median": float(np.median([r["pipeline_predicted_s"] /
                                                      r["pipeline_s"] - 1 for r in rows])),
            "step_error_median": float(np.median([r["step_predicted_s"] / r["step_s"] - 1
                                                  for r in rows])),
            "bubble_unit": costs.unit_bubble(progs)}


class Variant:
    """One layout timed in this process: its grid, stage, optimizer and runner. Variants with
    the same placement and stage split share one stage and optimizer (as the --ks runs do)."""

    def __init__(self, label, layout, grid, stage, opt, runner):
        self.label, self.layout, self.grid, self.stage = label, layout, grid, stage
        self.opt, self.runner = opt, runner
        self.acc = {"times": [], "losses": [], "forward": 0.0, "backward": 0.0, "waits": {},
                    "peak": 0, "cpu": 0.0, "wall": 0.0, "actions": [], "pipeline": []}


def variants(args, world, cfg):
    """Every (schedule variant, k) to time: --variant SCHED[@V][:LAYERS] entries, or the one
    --schedule; each for every k of --ks."""
    from mpigpt2.model.params import init_params
    from mpigpt2.model.stage import Stage
    from mpigpt2.parallel import layout as lay
    from mpigpt2.parallel.grid import make_grid
    from mpigpt2.parallel.optimizer import make_optimizer
    from mpigpt2.parallel.runtime import Runner
    specs = args.variant or [f"{args.schedule or ''}"
                             + (f"@{args.virtual_stages}" if args.virtual_stages else "")
                             + (f":{args.stage_layers}" if args.stage_layers else "")]
    ks = [int(k) for k in args.ks.split(",")] if args.ks else [args.T]
    shared, out = {}, []
    for text in specs:
        head, _, layers = text.partition(":")
        sched, _, v = head.partition("@")
        for k in ks:
            layout = lay.resolve(world.Get_size(), cfg, args.B, args.T, args.pp, args.dp,
                                 layers or None, args.M, k, sched or None,
                                 virtual_stages=int(v) if v else None)
            key = (layout.stage_layers, layout.ranks_of_stages)
            if key not in shared:
                grid = make_grid(world, args.pp, args.dp, wte_ranks=layout.wte_ranks,
                                 order=layout.rank_order)
                spec = layout.rank_spec(grid.stage)
                stage = Stage(cfg, spec, np.float32)
                init_params(cfg, spec, stage.p, seed=0)
                shared[key] = (grid, stage, make_optimizer(grid, stage))
            grid, stage, opt = shared[key]
            runner = Runner(grid, stage, layout, args.T, args.B // args.dp // args.M,
                            reducer=opt.reducer)
            out.append(Variant(head or args.label, layout, grid, stage, opt, runner))
    return out


def main():
    args = parse_args()
    from mpigpt2.base.malloc import tune
    tune()  # as mpigpt2.train does
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits
    from mpigpt2.parallel.collectives import barrier, sum_to_root
    from mpigpt2.model.config import GPTConfig, pad_vocab
    from mpigpt2.parallel.failure import install_excepthook
    from mpigpt2.parallel.step import train_step

    world = MPI.COMM_WORLD
    install_excepthook(world)
    threadpool_limits(1, user_api="blas")
    B, T = args.B, args.T
    cfg = GPTConfig(max_seq_len=T, vocab_size=args.V, padded_vocab_size=pad_vocab(args.V),
                    num_layers=args.L, num_heads=args.NH, channels=args.C)
    runs = variants(args, world, cfg)
    M, rows = args.M, B // args.dp
    grid0 = runs[0].grid
    toks = np.random.default_rng(1234).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    mine = toks[grid0.replica * rows:(grid0.replica + 1) * rows]
    x = np.ascontiguousarray(mine[:, :-1]).reshape(M, rows // M, T)
    y = np.ascontiguousarray(mine[:, 1:]).reshape(M, rows // M, T)
    dloss = 1.0 / (B * T)
    peak = {"bytes": 0}
    if args.track_activations:
        for stage in {id(r.stage): r.stage for r in runs}.values():
            track_activations(stage, peak)
    t = 0
    # round-robin over the variants, one step each, so that a burst of other load on a shared
    # machine hits every variant alike; round 0..warmup-1 is untimed
    for rnd in range(args.warmup + args.steps):
        for run in runs:
            peak["bytes"] = 0
            t += 1
            barrier(world)
            t0, c0 = time.perf_counter(), time.process_time()
            result = train_step(run.runner, run.opt, x, y, t, 1e-4, dloss)
            loss = sum_to_root(world, [result.loss_sum], run.grid.waiter)[0] / (B * T)
            barrier(world, run.grid.waiter)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            run.acc["losses"].append(float(loss))
            if rnd >= args.warmup:
                account(run.acc, result, dt, dc, peak)
    for run in runs:
        report(args, world, cfg, run)
    barrier(world)


def account(a, result, dt, dc, peak):
    """Add one timed step to a variant's accumulators."""
    a["times"].append(dt)
    a["cpu"] += dc
    a["wall"] += dt
    a["forward"] += result.times.get("forward", 0.0)
    a["backward"] += result.times.get("backward", 0.0)
    for kind, sec in result.waits.items():
        a["waits"][kind] = a["waits"].get(kind, 0.0) + sec
    a["peak"] = max(a["peak"], peak["bytes"])
    a["actions"].append(result.action_seconds)
    a["pipeline"].append(result.pipeline_s)


def report(args, world, cfg, run):
    """Gather a variant's per-rank numbers; rank 0 prints its BENCH_JSON line."""
    a, grid, stage, layout, T = run.acc, run.grid, run.stage, run.layout, args.T
    times = a["times"]
    p2p_bytes = sum(v.nbytes for v in run.runner.p2p.buf.values() if v is not None)
    per_rank = world.gather({
        "rank": world.Get_rank(), "stage": grid.stage, "replica": grid.replica,
        "layers": len(stage.spec.layers),
        "forward_s_per_step": a["forward"] / args.steps,
        "backward_s_per_step": a["backward"] / args.steps,
        "wait_s_per_step": {k: v / args.steps for k, v in a["waits"].items()},
        # CPU seconds this rank got per wall second of its steps: < 1 when it waited for
        # messages (sleeping) or was descheduled by other load
        "cpu_per_wall": a["cpu"] / a["wall"] if a["wall"] else None,
        "param_bytes": int(stage.flat.nbytes),
        "state_bytes": int(stage.flat.nbytes + stage.grad_flat.nbytes + run.opt.nbytes),
        "p2p_buffer_bytes": int(p2p_bytes),
        "peak_activation_bytes": int(a["peak"]) if args.track_activations else None,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "action_s_steps": a["actions"],  # per timed step, per compute action
        "pipeline_s_per_step": a["pipeline"],
    }, root=0)
    if world.Get_rank() == 0:
        B = args.B
        emit({"kind": "pipe", "label": run.label, "world": world.Get_size(),
              "model": {"L": cfg.num_layers, "NH": cfg.num_heads, "C": cfg.channels,
                        "V": cfg.vocab_size, "Vp": cfg.padded_vocab_size, "maxT": T},
              "B": B, "T": T, "layout": layout.as_dict(), "k": layout.slice_tokens,
              "n_slices": layout.n_slices(T), "warmup": args.warmup,
              **summary(times), "tokens_per_s_best": B * T / min(times),
              "tokens_per_s_median": B * T / float(np.median(times)),
              "losses": a["losses"], **prediction(layout, T, per_rank, times),
              "ranks": per_rank, "loadavg_end": os.getloadavg()})


if __name__ == "__main__":
    main()

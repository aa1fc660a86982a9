"""Step metrics: model FLOPs, phase times per rank, measured and predicted pipeline bubble, and
the end-of-run summary (the matmul peak behind MFU is observe.peak)."""

import functools
import time

import numpy as np

from mpigpt2.parallel import costs
from mpigpt2.parallel.schedule import COMPUTE

PHASES = ("forward", "backward", "p2p_wait", "allreduce", "allgather", "update")


def flops_per_token(cfg, T):
    """Training FLOPs per token: 6·(12·L·C² + V·C) + 12·L·T·C (matmuls; attention at full T)."""
    L, C, V = cfg.num_layers, cfg.channels, cfg.vocab_size
    return 6 * (12 * L * C * C + V * C) + 12 * L * T * C


def step_record(per_rank, layout, T):
    """Aggregate per-rank phase seconds (dicts with rank/stage, PHASES, "pipeline": the
    rank's schedule span, "actions": seconds of its compute actions in program order) into
    the metrics fields: phase ms per rank, the pipelined part's measured and predicted
    (simulated with the measured action costs) span and bubble, and the unit-cost bubble of
    the schedule (docs/design.md#predicted-and-measured-bubble)."""
    progs, unit = _programs(layout, T)
    pp = layout.pp
    compute = [[a for a in prog if a.kind in COMPUTE] for prog in progs]
    seconds, spans = {}, {}
    for r in per_rank:  # the mean over replicas of each action; each replica's span
        q, rep = layout.coords(r["rank"])
        for a, sec in zip(compute[q], r["actions"]):
            seconds[a] = seconds.get(a, 0.0) + sec / layout.dp
        spans[rep] = max(spans.get(rep, 0.0), r["pipeline"])
    span = float(np.mean(list(spans.values())))
    _, end, predicted = costs.measured_pipeline(progs, seconds)
    work = sum(seconds.values())
    return {
        "phases_ms": [dict({"rank": r["rank"], "stage": r["stage"]},
                           **{k: round(r[k] * 1000, 3) for k in PHASES}) for r in per_rank],
        "pipeline_ms": span * 1000, "pipeline_predicted_ms": end * 1000,
        "bubble": 1.0 - work / (pp * span) if span > 0 else 0.0,
        "bubble_predicted": predicted,
        "bubble_unit": unit,
    }


@functools.lru_cache(maxsize=4)
def _programs(layout, T):
    """(every pipe rank's program, the unit-cost bubble) of a layout, built once."""
    progs = layout.programs(T)
    return progs, costs.unit_bubble(progs)


def action_width(layout, T):
    """The longest compute-action list of any pipe rank (the per-rank metrics row pads to
    it)."""
    return max(sum(a.kind in COMPUTE for a in prog) for prog in _programs(layout, T)[0])


def node_cores(got, threads):
    """The cores the job uses, node by node: each node's own count of CPUs, at most its ranks
    × BLAS threads (got: (host, pid, CPUs, ranks on the node) of every rank)."""
    nodes = {host: min(cpus, here * threads) for host, _, cpus, here in got}
    return sum(nodes.values())


def phase_line(p):
    """One rank's phase times for the step line: forward, backward, waiting on pipeline
    messages, exposed gradient/parameter communication, update (ms)."""
    return (f"rank {p['rank']}: F {p['forward']:.0f} B {p['backward']:.0f} wait "
            f"{p['p2p_wait']:.0f} comm {p['allreduce'] + p['allgather']:.0f} up "
            f"{p['update']:.0f} ms")


def summary(steps, warmup):
    """Mean/median of step time, tokens/s and MFU over the steps after the warm-up."""
    kept = steps[warmup:] if len(steps) > warmup else steps
    if not kept:
        return {}
    ms = np.array([s["step_ms"] for s in kept])
    out = {"steps": len(kept), "warmup_excluded": len(steps) - len(kept),
           "step_ms_mean": float(ms.mean()), "step_ms_median": float(np.median(ms)),
           "tokens_per_s_mean": float(np.mean([s["tokens_per_s"] for s in kept]))}
    if "mfu" in kept[0]:
        out["mfu_mean"] = float(np.mean([s["mfu"] for s in kept]))
    return out


def duration(seconds):
    """Seconds as a short human duration: 42s, 3m05s, 2h07m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Elapsed time of the run and an ETA from the mean wall time per step so far (evaluation,
    sampling and checkpoints included: what the user waits for)."""

    def __init__(self, start_step, steps):
        self.start_step, self.steps = start_step, steps
        self.t0 = time.perf_counter()

    def line(self, done):
        elapsed = time.perf_counter() - self.t0
        per_step = elapsed / max(1, done - self.start_step)
        return f"{duration(elapsed)} elapsed, ETA {duration(per_step * (self.steps - done))}"


def step_line(rec, steps, pp, progress):
    """The line rank 0 prints after every step."""
    busiest = max(rec["phases_ms"], key=lambda p: p["forward"] + p["backward"])
    step = rec["step"]
    return (f"step {step + 1:5d}/{steps} | loss {rec['loss']:.6f} | lr {rec['lr']:.2e} | "
            f"{rec['step_ms']:7.1f} ms | {rec['tokens_per_s']:8.0f} tok/s "
            f"({rec['tokens_per_s_per_core']:.0f}/core) | MFU {rec['mfu'] * 100:5.1f}% | "
            + phase_line(busiest) + (f" | bubble {rec['bubble']:.2f} (predicted "
                                     f"{rec['bubble_predicted']:.2f}, unit costs "
                                     f"{rec['bubble_unit']:.2f})" if pp > 1 else "")
            + f" | {progress.line(step + 1)}")

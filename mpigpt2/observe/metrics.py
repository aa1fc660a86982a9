"""Step metrics: model FLOPs, the machine's matmul peak (probed once, cached), MFU, phase times
per rank, measured and predicted pipeline bubble, and the end-of-run summary."""

import json
import os
import platform
import time

import numpy as np

PHASES = ("forward", "backward", "p2p_wait", "allreduce", "allgather", "update")
CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")),
                     "mpigpt2", "peak.json")


def flops_per_token(cfg, T):
    """Training FLOPs per token: 6·(12·L·C² + V·C) + 12·L·T·C (matmuls; attention at full T)."""
    L, C, V = cfg.num_layers, cfg.channels, cfg.vocab_size
    return 6 * (12 * L * C * C + V * C) + 12 * L * T * C


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def probe_peak_gflops(seconds=0.5):
    """Best single-thread float32 matmul GFLOP/s on GPT-2-like shapes (threads limited to 1)."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    a = rng.random((1024, 768), dtype=np.float32)
    b = rng.random((768, 3072), dtype=np.float32)
    best, t_end = 0.0, time.perf_counter() + seconds
    with threadpool_limits(1, user_api="blas"):
        a @ b
        while time.perf_counter() < t_end or best == 0.0:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * 1024 * 768 * 3072 / (time.perf_counter() - t) / 1e9)
    return best


def peak_gflops_per_core(override=None):
    """(GFLOP/s per core, source): --peak-gflops, else the cached probe, else a new probe."""
    if override:
        return float(override), "--peak-gflops"
    key = f"{_cpu_name()}|numpy {np.__version__}|{os.environ.get('OPENBLAS_CORETYPE', '')}"
    try:
        with open(CACHE) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return float(cached["gflops"]), f"cached probe ({CACHE})"
    except (OSError, ValueError, KeyError):
        pass
    g = probe_peak_gflops()
    try:
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        from mpigpt2.formats.atomic import atomic_write_text
        atomic_write_text(CACHE, json.dumps({"key": key, "gflops": g}))
    except OSError:
        pass
    return g, "probe"


def predicted_bubble(pp, M, n):
    return (pp - 1) / (M * n + pp - 1)


def step_record(per_rank, step_s, layout, T):
    """Aggregate per-rank phase seconds (list of dicts with rank/stage and PHASES) into the
    metrics fields: phase ms per rank, and the measured bubble (mean over ranks of the time
    blocked on pipeline messages, relative to the pipelined part of the step)."""
    n = T // layout.slice_tokens
    bub = []
    for r in per_rank:
        busy = r["forward"] + r["backward"] + r["p2p_wait"]
        bub.append(r["p2p_wait"] / busy if busy > 0 else 0.0)
    return {
        "phases_ms": [dict({"rank": r["rank"], "stage": r["stage"]},
                           **{k: round(r[k] * 1000, 3) for k in PHASES}) for r in per_rank],
        "bubble": float(np.mean(bub)) if layout.pp > 1 else 0.0,
        "bubble_predicted": predicted_bubble(layout.pp, layout.microbatches, n),
    }


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


def rows_before(path, step):
    """The metrics rows a run resumed at `step` keeps: every step row before it and the
    validation at `step` itself (it was logged after that step's checkpoint). Lines that do
    not parse (a run killed while writing one) and the old summary are dropped."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return rows
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if not isinstance(r, dict) or r.get("summary") or not isinstance(r.get("step"), int):
            continue
        if r["step"] < step or (r["step"] == step and "val_loss" in r and "loss" not in r):
            rows.append(r)
    return rows


def gather_rows(comm, phase_seconds, loss_sum, stage):
    """Polled gather of every rank's phase times and loss sum to rank 0.

    Returns (per-rank dicts, total loss sum) on rank 0 and (None, None) elsewhere; a blocking
    gather would busy-spin on ranks that finished their step early.
    """
    from mpigpt2.parallel.waiting import wait_all
    row = np.array(list(phase_seconds) + [loss_sum, stage], dtype=np.float64)
    out = np.empty((comm.Get_size(), row.size)) if comm.Get_rank() == 0 else None
    wait_all([comm.Igather(row, out, root=0)], "reduce", lambda: "per-step metrics gather")
    if out is None:
        return None, None
    per_rank = [dict(zip(PHASES, r[:len(PHASES)]), rank=i, stage=int(r[-1]))
                for i, r in enumerate(out)]
    return per_rank, float(out[:, len(PHASES)].sum())

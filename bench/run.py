"""The mpigpt2 benchmark suite: ratios measured side by side in one run on this machine.

    python bench/run.py [--quick] [--out bench/results.json] [--only 1,3]

Every measurement runs as a subprocess (its own process group, killed on timeout), prints one
BENCH_JSON line per result, and becomes rows {name, config, metric, value, target, met,
machine, notes, details} in results.json and a markdown table in results.md next to it.
See bench/README.md for what each row means.
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (BENCH_DIR, machine_info, machine_line, mpiexec, parse_lines,  # noqa: E402
                    python, run_cmd, summary)

T0 = time.perf_counter()


def log(msg):
    print(f"[bench {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# running sub-benchmarks, with a measure of how much CPU other processes took meanwhile

def _busy_seconds():
    """CPU seconds all processes spent busy so far (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class SubprocessFailed(RuntimeError):
    pass


QUIET_THRESHOLD = 0.10  # other processes' share of the CPUs below which we measure


def wait_quiet(ctx):
    """Before a measurement, wait (within a run-wide budget) until other processes use < 10 %
    of the CPUs over one second; returns that last fraction (None when not checked)."""
    quiet = ctx["quiet"]
    left = quiet["budget_s"] - quiet["waited_s"]
    if left <= 0 or _busy_seconds() is None:
        return None
    t0 = time.perf_counter()
    while True:
        b0 = _busy_seconds()
        time.sleep(1.0)
        frac = (_busy_seconds() - b0) / (os.cpu_count() or 1)
        waited = time.perf_counter() - t0
        if frac < QUIET_THRESHOLD or waited >= left:
            break
    quiet["waited_s"] += waited
    if waited > 1.5:
        log(f"  waited {waited:.0f} s for other load to drop (now {100 * frac:.0f} % of the CPUs)")
    return frac


def sub(ctx, cmd, timeout, what, attempts=2, env=None):
    """Run one sub-benchmark; return (result lines, info) or raise SubprocessFailed.

    A run that fails other than by timing out is retried once (on this shared machine a rank
    has been seen to receive a SIGTERM from someone else's clean-up); info["attempts"] says so.
    """
    for attempt in range(1, attempts + 1):
        before = wait_quiet(ctx)
        busy0, own0 = _busy_seconds(), _children_cpu()
        rc, out, err, wall = run_cmd(cmd, timeout, env_extra={**ctx["env"], **(env or {})},
                                     log=log)
        busy1, own1 = _busy_seconds(), _children_cpu()
        info = {"wall_s": wall, "cmd": " ".join(cmd), "others_cpu_frac_before": before,
                "attempts": attempt}
        if busy0 is not None:
            # CPU time used by processes other than this suite, as a fraction of the machine
            others = max(0.0, (busy1 - busy0) - (own1 - own0))
            info["others_cpu_frac"] = others / (wall * (os.cpu_count() or 1))
        lines = parse_lines(out)
        if rc == 0 and lines:
            log(f"  done in {wall:.1f} s (others used {100 * info.get('others_cpu_frac', 0):.0f}"
                f" % of the CPUs meanwhile)")
            return lines, info
        tail = "\n".join((err or out).strip().splitlines()[-12:])
        msg = f"{what}: exit {rc}, {len(lines)} result lines (attempt {attempt})\n{tail}"
        if rc is None or attempt == attempts:
            raise SubprocessFailed(msg)
        log(f"  failed ({msg.splitlines()[0]}); retrying once")


OPS = {"≥": lambda x, v, tol: x >= v, ">": lambda x, v, tol: x > v,
       "≤": lambda x, v, tol: x <= v, "<": lambda x, v, tol: x < v,
       "≈": lambda x, v, tol: abs(x - v) <= tol}


@dataclass(frozen=True)
class Target:
    """A row's goal, declared once where the row is made: `Target("≥", 1.85)`; "≈" takes an
    absolute tol. note explains the number (shown in brackets); the row checks itself."""
    op: str
    value: float
    tol: float = 0.0
    note: str = ""

    def __post_init__(self):
        assert self.op in OPS, self.op

    def check(self, x):
        return None if x is None else bool(OPS[self.op](x, self.value, self.tol))

    def __str__(self):
        tol = f" ± {self.tol:g}" if self.op == "≈" and self.tol else ""
        return f"{self.op} {self.value:g}{tol}" + (f" ({self.note})" if self.note else "")


def row(rid, name, config, metric, value, *, target=None, reference=None, judged=None,
        also=True, notes="", details=None):
    """One result row. target: a Target the value (or `judged`, when the goal is stated on
    another number than the one shown) must meet, and `also` (a further condition); reference:
    a number to compare with by eye when there is no target."""
    met = None
    if target is not None:
        met = bool(target.check(value if judged is None else judged)) and bool(also)
    return {"id": rid, "name": name, "config": config, "metric": metric, "value": value,
            "target": str(target) if target is not None else reference, "met": met,
            "notes": notes, "details": details or {}}


def error_row(rid, name, config, err):
    log(f"  FAILED: {err}")
    r = row(rid, name, config, "error", None, notes=str(err).splitlines()[0],
            details={"error": str(err)})
    r["met"] = False  # a failed measurement never meets its target
    return r


# ------------------------------------------------------------------------------------------------
# row 0: the torch baseline computes the same function

def bench_check(ctx):
    cfg = "L2 NH4 C64 V500/Vp512, B3 T32, float32, same weights and tokens"
    try:
        (res,), info = sub(ctx, [python(), "bench/single_step.py", "--check"], 120, "torch check")
    except SubprocessFailed as e:
        return [error_row("0", "torch baseline == mpigpt2", cfg, e)]
    worst = max(max(res[h]["loss_rel_diff"], res[h]["grad_max_rel_diff"])
                for h in ("padded", "sliced"))
    return [row("0", "torch baseline == mpigpt2", cfg,
                "max rel. diff of loss and grads (wte, qkvw, fcw)", worst,
                target=Target("<", 1e-4), notes="both lm_head forms (padded, sliced)",
                details={**res, **info})]


# ------------------------------------------------------------------------------------------------
# rows 1 and 2: one process, one thread, mpigpt2 vs PyTorch; MFU vs the matmul peak

def pool(results):
    """Merge the timed steps of several rounds (separate processes) of one measurement."""
    steps = [t for r in results for t in r["steps_s"]]
    tokens = results[-1]["B"] * results[-1]["T"]
    out = dict(results[-1])
    out.update(summary(steps), rounds=len(results),
               others_cpu_frac=max(r.get("others_cpu_frac", 0.0) for r in results),
               tokens_per_s_best=tokens / min(steps),
               tokens_per_s_median=tokens / statistics.median(steps))
    if "phases_median_s" in out:
        out["phases_median_s"] = {k: statistics.median(r["phases_median_s"][k] for r in results)
                                  for k in out["phases_median_s"]}
    if "ranks" in out:  # memory peaks over all rounds
        for i, rk in enumerate(out["ranks"]):
            for key in ("max_rss_mb", "peak_activation_bytes"):
                vals = [r["ranks"][i][key] for r in results if r["ranks"][i][key] is not None]
                rk[key] = max(vals) if vals else None
    return out


def bench_single(ctx):
    quick = ctx["quick"]
    # (B, T, warm-up, timed steps, rounds): rounds alternate the implementations so that a burst
    # of other load on the shared machine hits both, not one
    configs = [(4, 64, 1, 2, 1)] if quick else [(4, 64, 1, 3, 2), (8, 256, 1, 2, 1)]
    rows, results = [], {}
    for B, T, warmup, steps, rounds in configs:
        cfgname = (f"gpt2-124m B={B} T={T}, 1 thread, fp32, {rounds} round(s) of warm-up "
                   f"{warmup} + {steps} timed steps")
        timeout = 120 + (warmup + steps) * (30 if T <= 64 else 120)
        impls = [("mpigpt2", []), ("torch", ["--torch-head", "sliced"])]
        if not quick and T == 64:
            impls.append(("torch-padded", ["--torch-head", "padded"]))
        raw = {impl: [] for impl, _ in impls}
        for _ in range(rounds):
            for impl, extra in impls:
                cmd = [python(), "bench/single_step.py", "--impl", impl.split("-")[0], "--B",
                       str(B), "--T", str(T), "--warmup", str(warmup), "--steps", str(steps)]
                try:
                    (res,), info = sub(ctx, cmd + extra, timeout, f"{impl} B{B}T{T}")
                    raw[impl].append({**res, **info})
                except SubprocessFailed as e:
                    rows.append(error_row(f"1.B{B}T{T}.{impl}", f"single/{impl}", cfgname, e))
        got = {impl: pool(rs) for impl, rs in raw.items() if rs}
        results[(B, T)] = got
        for impl, r in got.items():
            note = (f"median {r['tokens_per_s_median']:.1f} tok/s; phases (median s) "
                    + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_median_s"].items()))
            if "optimizer" in r:
                note += f"; AdamW {r['optimizer']}, lm_head {r['head']}"
            note += f"; CPU/wall {r['cpu_per_wall']:.2f}"
            rows.append(row(f"1.B{B}T{T}.{impl}", f"single/{impl} tokens/s", cfgname,
                            "tokens/s (best step)", r["tokens_per_s_best"], notes=note, details=r))
        torch_rs = [r for k, r in got.items() if k.startswith("torch")]
        if "mpigpt2" in got and torch_rs:
            ours = got["mpigpt2"]
            fastest = max(torch_rs, key=lambda r: r["tokens_per_s_best"])
            ratio = ours["tokens_per_s_best"] / fastest["tokens_per_s_best"]
            med = ours["tokens_per_s_median"] / max(r["tokens_per_s_median"] for r in torch_rs)
            rows.append(row(f"1.B{B}T{T}", "single/ratio mpigpt2 ÷ torch", cfgname,
                            "tokens/s ratio (best ÷ fastest torch best)", ratio,
                            target=Target("≥", 1.1), notes=f"median ÷ median {med:.2f}; torch "
                            f"lm_head {fastest['head']}, AdamW {fastest['optimizer']}",
                            details={"median_ratio": med, "others_cpu_frac": max(
                                r.get("others_cpu_frac", 0.0) for r in got.values())}))
    ctx["single"] = results
    return rows


def bench_mfu(ctx):
    from mpigpt2.model.config import PRESETS
    from mpigpt2.observe.metrics import flops_per_token
    cfg = PRESETS["gpt2-124m"]
    reps = 3 if ctx["quick"] else 7
    try:
        (peak,), info = sub(ctx, [python(), "bench/matmul_peak.py", "--reps", str(reps)], 120,
                            "matmul peak")
    except SubprocessFailed as e:
        return [error_row("2.peak", "mfu/peak", "numpy fp32 matmul, 1 thread", e)]
    P = peak["peak_gflops"] * 1e9
    rows = [row("2.peak", "mfu/matmul peak", "numpy float32 matmul, 1 BLAS thread, GPT-2 shapes "
                f"at 2048 tokens, best of {reps}", "GFLOP/s (best shape)", peak["peak_gflops"],
                notes="; ".join(f"{k}: {v:.0f}" for k, v in peak["gflops_per_shape"].items()),
                details={**peak, **info})]
    for (B, T), got in ctx.get("single", {}).items():
        fpt = flops_per_token(cfg, T)  # the issue's 6·(12·L·C² + V·C) + 12·L·T·C
        for impl, r in got.items():
            mfu = fpt * r["tokens_per_s_best"] / P
            is_target = impl == "mpigpt2" and (B, T) == (8, 256)
            rows.append(row(f"2.B{B}T{T}.{impl}", f"mfu/{impl}", f"gpt2-124m B={B} T={T}, 1 thread",
                            "MFU (best step) vs measured peak", mfu,
                            target=Target("≥", 0.80) if is_target else None,
                            notes=f"{fpt / 1e6:.0f} MFLOP/token (V={cfg.vocab_size}) × "
                            f"{r['tokens_per_s_best']:.1f} tok/s = {fpt * r['tokens_per_s_best'] / 1e9:.1f}"
                            f" GFLOP/s; median-step MFU {fpt * r['tokens_per_s_median'] / P:.2f}",
                            details={"flops_per_token": fpt, "peak_gflops": peak["peak_gflops"],
                             "others_cpu_frac": max(r.get("others_cpu_frac", 0.0),
                                                    info.get("others_cpu_frac", 0.0))}))
    return rows


# ------------------------------------------------------------------------------------------------
# rows 3-5: the MPI runtime (bench/pipe_step.py under mpiexec)

def model_flags(m):
    return ["--L", str(m["L"]), "--NH", str(m["NH"]), "--C", str(m["C"]), "--V", str(m["V"])]


def model_name(m):
    return f"L{m['L']} NH{m['NH']} C{m['C']} V{m['V']}"


def pipe_run(ctx, n, flags, timeout, what):
    cmd = [mpiexec(), "-n", str(n), python(), "bench/pipe_step.py"] + flags
    return sub(ctx, cmd, timeout, what)


def bench_slicing(ctx):
    m, B, T = ctx["pipe_model"], ctx["pipe_B"], ctx["pipe_T"]
    divs = (1, 8) if ctx["quick"] else (1, 2, 4, 8, 16)
    ks = [T // d for d in divs]
    warm, steps = (1, 2) if ctx["quick"] else (1, 3)
    cfg = (f"{model_name(m)}, B={B} T={T}, pp=2 dp=1 M=1, 1 thread/rank, "
           f"warm-up {warm} + {steps} steps")
    flags = model_flags(m) + ["--B", str(B), "--T", str(T), "--pp", "2", "--dp", "1", "--M", "1",
                              "--ks", ",".join(map(str, ks)), "--warmup", str(warm),
                              "--steps", str(steps), "--label", "slicing"]
    try:
        lines, info = pipe_run(ctx, 2, flags, 900 if not ctx["quick"] else 240, "pp=2 slicing sweep")
    except SubprocessFailed as e:
        return [error_row("3", "pipe-slicing", cfg, e)]
    base = next((r for r in lines if r["k"] == T), None)
    rows, p = [], 2
    for r in lines:
        n = r["n_slices"]
        ideal = p * n / (n + p - 1)  # M = 1: step ∝ (n + p − 1)/n slices of the whole stage
        speed = base["best_s"] / r["best_s"] if base else None
        busy = max(x["forward_s_per_step"] + x["backward_s_per_step"] for x in r["ranks"])
        util = sum(x["forward_s_per_step"] + x["backward_s_per_step"] for x in r["ranks"]) / (
            p * r["median_s"])
        is_target = n == 8
        label = "T" if n == 1 else f"T/{n}"
        rows.append(row(f"3.k={label}", f"pipe-slicing k={label}", f"{cfg}; k={r['k']}",
                        "speedup vs k=T (best step)", speed,
                        target=Target("≥", 1.6, note=f"ideal {ideal:.2f}") if is_target else None,
                        reference=f"ideal {ideal:.2f}",
                        notes=f"step {r['best_s']:.2f} s (median {r['median_s']:.2f}); busiest rank "
                        f"computes {busy:.2f} s/step; utilisation {util:.2f} (ideal "
                        f"{n / (n + p - 1):.2f}); stages {r['layout']['stage_layers']} computing "
                        + " / ".join(f"{x['forward_s_per_step'] + x['backward_s_per_step']:.2f}"
                                     for x in r["ranks"]) + " s/step; CPU/wall per rank "
                        + ", ".join(f"{x['cpu_per_wall']:.2f}" for x in r["ranks"]),
                        details={**r, **info, "ideal_speedup": ideal}))
    return rows


def bench_dp(ctx):
    m, b, T = ctx["pipe_model"], ctx["pipe_B"], ctx["pipe_T"]
    warm, steps, rounds = (1, 2, 1) if ctx["quick"] else (1, 2, 2)
    cfg = (f"{model_name(m)}, T={T}, {b} sequences per rank, pp=1 M=1, 1 thread/rank, "
           f"{rounds} alternating round(s) of warm-up {warm} + {steps} steps")
    raw, rows = {1: [], 2: []}, []
    for _ in range(rounds):
        for dp in (1, 2):
            flags = model_flags(m) + ["--B", str(b * dp), "--T", str(T), "--pp", "1", "--dp",
                                      str(dp), "--M", "1", "--warmup", str(warm), "--steps",
                                      str(steps), "--label", f"dp{dp}"]
            try:
                (r,), info = pipe_run(ctx, dp, flags, 600 if not ctx["quick"] else 180, f"dp={dp}")
                raw[dp].append({**r, **info})
            except SubprocessFailed as e:
                rows.append(error_row(f"4.dp{dp}", f"dp-scaling dp={dp}", cfg, e))
    got = {dp: pool(rs) for dp, rs in raw.items() if rs}
    for dp, r in got.items():
        waits = max(sum(x["wait_s_per_step"].values()) for x in r["ranks"])
        rows.append(row(f"4.dp{dp}", f"dp-scaling dp={dp} tokens/s", cfg + f"; B={b * dp}",
                        "tokens/s (best step)", r["tokens_per_s_best"], notes=(
                            f"step {r['best_s']:.2f} s (median {r['median_s']:.2f}); waiting "
                            f"{waits:.2f} s/step on the slowest rank; CPU/wall per rank "
                            + ", ".join(f"{x['cpu_per_wall']:.2f}" for x in r["ranks"])),
                        details=r))
    if len(got) == 2:
        ratio = got[2]["tokens_per_s_best"] / got[1]["tokens_per_s_best"]
        med = got[2]["tokens_per_s_median"] / got[1]["tokens_per_s_median"]
        rows.append(row("4", "dp-scaling 1→2 ranks", cfg, "tokens/s ratio dp=2 ÷ dp=1 (best)",
                        ratio, target=Target("≥", 1.85), notes=f"median ÷ median {med:.2f}",
                        details={"others_cpu_frac": max(x.get("others_cpu_frac", 0.0)
                                                        for x in got.values())}))
    return rows


def bench_schedules(ctx):
    m, T = ctx["pipe_model"], ctx["pipe_T"]
    M = 4 if ctx["quick"] else 8
    B = 2 * M  # two sequences per micro-batch
    k = T // 4
    warm, steps, rounds = (1, 1, 1) if ctx["quick"] else (1, 2, 2)
    cfg = (f"{model_name(m)}, B={B} T={T}, pp=2 dp=1 M={M} (b=2), k=T/4={k}, 1 thread/rank, "
           f"{rounds} alternating round(s) of warm-up {warm} + {steps} steps, own processes "
           "per schedule")
    raw, rows = {"gpipe": [], "1f1b": []}, []
    for _ in range(rounds):
        for sched in ("gpipe", "1f1b"):
            flags = model_flags(m) + ["--B", str(B), "--T", str(T), "--pp", "2", "--dp", "1",
                                      "--M", str(M), "--ks", str(k), "--schedule", sched,
                                      "--warmup", str(warm), "--steps", str(steps),
                                      "--track-activations", "--label", sched]
            try:
                (r,), info = pipe_run(ctx, 2, flags, 600 if not ctx["quick"] else 180, sched)
                raw[sched].append({**r, **info})
            except SubprocessFailed as e:
                rows.append(error_row(f"5.{sched}", f"schedule {sched}", cfg, e))
    got = {s: pool(rs) for s, rs in raw.items() if rs}
    for sched, r in got.items():
        act = [x["peak_activation_bytes"] / 2**20 for x in r["ranks"]]
        rss = [x["max_rss_mb"] for x in r["ranks"]]
        state = [x["state_bytes"] / 2**20 for x in r["ranks"]]
        rows.append(row(f"5.{sched}.time", f"schedule {sched} step time", cfg, "s (best step)",
                        r["best_s"], notes=f"median {r['median_s']:.2f} s", details=r))
        rows.append(row(f"5.{sched}.act", f"schedule {sched} activations held", cfg,
                        "peak MiB per rank (max over ranks)", max(act),
                        notes="per rank " + ", ".join(f"{a:.0f}" for a in act)
                        + " MiB (KV caches + dK/dV + saved slice activations)",
                        details={"others_cpu_frac": r.get("others_cpu_frac")}))
        rows.append(row(f"5.{sched}.rss", f"schedule {sched} peak RSS", cfg,
                        "peak RSS MiB per rank (max over ranks)", max(rss),
                        notes="per rank " + ", ".join(f"{a:.0f}" for a in rss) + " MiB; params+"
                        "grads+Adam " + ", ".join(f"{a:.0f}" for a in state) + " MiB",
                        details={"others_cpu_frac": r.get("others_cpu_frac")}))
    if len(got) == 2:
        g, f = got["gpipe"], got["1f1b"]
        oc = {"others_cpu_frac": max(x.get("others_cpu_frac", 0.0) for x in got.values())}
        t = f["best_s"] / g["best_s"]
        a = max(x["peak_activation_bytes"] for x in f["ranks"]) / max(
            x["peak_activation_bytes"] for x in g["ranks"])
        r_ = max(x["max_rss_mb"] for x in f["ranks"]) / max(x["max_rss_mb"] for x in g["ranks"])
        n = T // k
        # units of (micro-batch, slice) activations stage 0 holds at most
        pred = min(M * n, n + 2 - 1) / (M * n)  # p = 2 stages
        rows.append(row("5.time", "1F1B ÷ GPipe step time", cfg, "ratio (best steps)", t,
                        target=Target("≤", 1.05, note="same bubble"), details=oc))
        rows.append(row("5.act", "1F1B ÷ GPipe activations held", cfg,
                        "ratio of peak activation bytes (max rank)", a,
                        target=Target("<", 1.0, note=f"unit count predicts {pred:.2f}"),
                        notes="KV caches are allocated per micro-batch for all T, so they do not "
                        "shrink with slicing", details=oc))
        rows.append(row("5.rss", "1F1B ÷ GPipe peak RSS", cfg, "ratio of peak RSS (max rank)", r_,
                        target=Target("<", 1.0), details=oc))
    return rows


# ------------------------------------------------------------------------------------------------
# row 6: parameter bytes per stage

def bench_param_memory(ctx):
    cfg = "default compute-balanced partition for T=1024, float32"
    try:
        lines, info = sub(ctx, [python(), "bench/param_memory.py"], 120, "param memory")
    except SubprocessFailed as e:
        return [error_row("6", "param-memory", cfg, e)]
    rows = []
    for r in lines:
        pp, model = r["pp"], r["model"]
        ideal = 1.0 / pp
        wte = r["wte_bytes"] / r["full_bytes"]
        rows.append(row(f"6.{model}.pp{pp}", f"param-memory {model} pp={pp}",
                        f"{model}, {cfg}; stages {r['stage_layers']}",
                        "max per-rank param bytes ÷ full model", r["max_ratio"],
                        target=Target("≤", round(1.15 * ideal, 4),
                                      note=f"1/pp = {ideal:.3f} plus 15 %"),
                        notes="per stage " + ", ".join(f"{s['ratio']:.3f}" for s in r["stages"])
                        + f"; mean {r['sum_ratio'] / pp:.3f}; transformer blocks alone: largest "
                        f"stage {r['max_layer_ratio']:.3f} of them; wte is {wte:.3f} of the model"
                        + ("" if pp == 1 else f" and held by the first and the last stage, so no "
                           f"partition gets below (1 + {wte:.3f})/pp = {r['lower_bound']:.3f}"),
                        details={**r, **info}))
    return rows


# ------------------------------------------------------------------------------------------------
# row 7: ZeRO-1 — optimizer memory per rank and exposed communication with / without overlap

def train_run(ctx, n, flags, label, timeout=900, env=None):
    cmd = [python(), "bench/train_run.py", "-n", str(n), "--label", label, "--"] + flags
    lines, info = sub(ctx, cmd, timeout, label, env=env)
    return dict(lines[0], **info)


def bench_zero(ctx):
    steps = "5" if ctx["quick"] else "8"
    B, T = ("4", "32") if ctx["quick"] else ("8", "64")
    model = "gpt2-tiny" if ctx["quick"] else "gpt2-124m"
    base = ["--model", model, "--batch-size", B, "--seq-len", T, "--steps", steps,
            "--train-data", "data/tinyshakespeare/tiny_shakespeare_train.bin"]
    cfg = f"{model} B={B} T={T}, pp=1, 1 thread/rank, {steps} steps (2 warm-up excluded)"
    rows, got = [], {}
    for dp in (2, 4):
        for zero in ("0", "1"):
            for overlap in (True, False):
                if dp == 4 and not overlap:
                    continue
                label = f"zero{zero} dp{dp}" + ("" if overlap else " no-overlap")
                flags = base + ["--dp", str(dp), "--zero", zero] + \
                    ([] if overlap else ["--no-overlap"])
                try:
                    got[(dp, zero, overlap)] = r = train_run(ctx, dp, flags, label)
                except SubprocessFailed as e:
                    rows.append(error_row(f"7.{label}", label, cfg, e))
                    continue
                rows.append(row(f"7.{label}", f"zero/{label} exposed comm", cfg,
                                "ms per step (median; slowest rank's allreduce + allgather waits)",
                                r["exposed_comm_ms_median"],
                                notes=f"step {r['median_step_ms']:.0f} ms median; optimizer "
                                f"{max(r['optim_bytes']) / 2**20:.1f} MiB per rank", details=r))
    for dp in (2, 4):
        if (dp, "0", True) in got and (dp, "1", True) in got:
            z0, z1 = got[(dp, "0", True)], got[(dp, "1", True)]
            ratio = max(z1["optim_bytes"]) / max(z0["optim_bytes"])
            rows.append(row(f"7.mem.dp{dp}", f"zero/optimizer memory per rank dp={dp}", cfg,
                            "ZeRO-1 ÷ ZeRO-0 Adam bytes per rank (max rank)", ratio,
                            target=Target("≈", round(1 / dp, 4), tol=0.01, note="1/dp"),
                            notes=f"{max(z1['optim_bytes']) / 2**20:.1f} vs "
                            f"{max(z0['optim_bytes']) / 2**20:.1f} MiB"))
    # pp = 2 × dp = 2: the tied wte lives on both stages; ZeRO-1 shards its state over the 4
    # ranks that hold it, so the world keeps one copy of the optimizer state
    from mpigpt2.model.config import PRESETS
    from mpigpt2.model.params import num_parameters
    full = 2 * 4 * num_parameters(PRESETS[model])  # fp32 m and v of the whole model
    pcfg = f"{model} B={B} T={T}, pp=2 dp=2 M=2, 1 thread/rank, {steps} steps"
    for zero in ("0", "1"):
        label = f"zero{zero} pp2 dp2"
        try:
            got[("pp2", zero)] = train_run(ctx, 4, base + ["--pp", "2", "--dp", "2", "--zero", zero,
                                                      "--microbatches", "2"], label)
        except SubprocessFailed as e:
            rows.append(error_row(f"7.{label}", label, pcfg, e))
    if ("pp2", "1") in got:
        r1 = got[("pp2", "1")]
        world, most = sum(r1["optim_bytes"]) / full, max(r1["optim_bytes"]) / full
        z0 = got.get(("pp2", "0"))
        # each rank: its stage's parameters but wte ÷ dp, plus wte ÷ (2·dp) (pp 2: both
        # stages hold wte), two fp32 moments
        from mpigpt2.model.config import PRESETS as P
        wte = P[model].padded_vocab_size * P[model].channels * 4
        expect = [2 * ((pb - wte) / 2 + wte / 4) for pb in r1["param_bytes"]]
        shares_ok = all(abs(b - e) <= 0.001 * e for b, e in zip(r1["optim_bytes"], expect))
        rows.append(row("7.mem.pp2dp2", "zero/optimizer memory pp=2 dp=2", pcfg,
                        "Adam bytes per rank ÷ the model's (max rank)", most,
                        reference="world total = 1 copy; each rank its stage's share ÷ dp "
                        "(wte ÷ 2·dp)", target=Target("≈", 1.0, tol=1e-3, note="world total = 1 "
                                                      "copy; each rank its stage's share ÷ dp "
                                                      "(wte ÷ 2·dp)"),
                        judged=world, also=shares_ok,
                        notes="per rank " + ", ".join(f"{b / full:.3f}" for b in r1["optim_bytes"])
                        + f" (stage shares follow the compute-balanced partition "
                        f"{r1['layout']['stage_layers']}); sum over the world {world:.4f} of "
                        f"the model's" + (f"; ZeRO-0 per rank " + ", ".join(
                            f"{b / full:.3f}" for b in z0["optim_bytes"]) if z0 else ""),
                        details=r1))
    for zero in ("0", "1"):
        a, b = got.get((2, zero, True)), got.get((2, zero, False))
        if a and b and b["exposed_comm_ms_median"] > 0:
            ratio = a["exposed_comm_ms_median"] / b["exposed_comm_ms_median"]
            rows.append(row(f"7.overlap.zero{zero}", f"zero/overlap gain zero={zero} dp=2", cfg,
                            "exposed comm with overlap ÷ without", ratio, target=Target("<", 1.0),
                            notes=f"{a['exposed_comm_ms_median']:.1f} vs "
                            f"{b['exposed_comm_ms_median']:.1f} ms; steps "
                            f"{a['median_step_ms']:.0f} vs {b['median_step_ms']:.0f} ms"))
    return rows


# ------------------------------------------------------------------------------------------------
# row 8: --slice-tokens auto — its predicted step time against the measured one

def bench_autotune(ctx):
    m, B, T = ctx["pipe_model"], ctx["pipe_B"], ctx["pipe_T"]
    steps = "5" if ctx["quick"] else "8"
    cfg = f"gpt2-tiny, B=8 T=64, pp=2 dp=1 M=2, --slice-tokens auto, {steps} steps"
    flags = ["--model", "gpt2-tiny", "--batch-size", "8", "--seq-len", "64", "--steps", steps,
             "--pp", "2", "--microbatches", "2", "--slice-tokens", "auto",
             "--train-data", "data/tinyshakespeare/tiny_shakespeare_train.bin"]
    try:
        r = train_run(ctx, 2, flags, "autotune")
    except SubprocessFailed as e:
        return [error_row("8", "autotune", cfg, e)]
    tuned = r["autotune"] or {}
    pred = tuned.get("predicted_step_ms")
    ratio = r["median_step_ms"] / pred if pred else None
    return [row("8", "autotune prediction vs measurement", cfg + f"; chose k={tuned.get('slice_tokens')}",
                "measured ÷ predicted step time", ratio,
                reference="≈ 1 (compute-only prediction)", notes=f"predicted {pred} ms, measured {r['median_step_ms']:.1f} ms median; candidates "
                + ", ".join(f"k={c['k']}: {c['predicted_step_ms']:.0f}"
                            for c in tuned.get("candidates", [])), details=r)]


# ------------------------------------------------------------------------------------------------
# row 9: more ranks than cores (the default `mpirun -n 8` on 2 cores) stays efficient

def bench_oversubscribed(ctx):
    steps = "5" if ctx["quick"] else "8"
    B = "16"
    base = ["--model", "gpt2-tiny", "--batch-size", B, "--seq-len", "64", "--steps", steps,
            "--train-data", "data/tinyshakespeare/tiny_shakespeare_train.bin"]
    cfg = f"gpt2-tiny B={B} T=64, {steps} steps (2 warm-up excluded), {os.cpu_count()} cores"
    pp4 = ["--pp", "4", "--microbatches", "4", "--slice-tokens", "16"]
    blocking = {"MPIGPT2_BLOCKING_WAITS": "1"}
    runs = [("n1", 1, ["--threads", str(os.cpu_count() or 1)], None),
            ("n2", 2, ["--dp", "2"], None),
            ("n8", 8, [], None),
            ("n8.blocking", 8, [], blocking),
            ("n8.pp4", 8, pp4, None),
            ("n8.pp4.blocking", 8, pp4, blocking)]
    rows, got = [], {}
    for rid, n, flags, env in runs:
        what = f"{n} rank(s) {' '.join(flags) or 'default layout'}" + (
            ", MPICH's blocking waits" if env else "")
        try:
            got[rid] = r = train_run(ctx, n, base + flags, rid, env=env)
        except SubprocessFailed as e:
            rows.append(error_row(f"9.{rid}", rid, cfg, e))
            continue
        tps = int(B) * 64 / (r["best_step_ms"] / 1000)
        rows.append(row(f"9.{rid}", f"oversubscribed/{what}", cfg, "tokens/s (best step)", tps,
                        notes=f"layout pp {r['layout']['pp']} × dp {r['layout']['dp']}; median "
                        f"step {r['median_step_ms']:.0f} ms", details=r))
        r["tps"] = tps
    if "n8" in got and "n2" in got:
        ratio = got["n8"]["tps"] / got["n2"]["tps"]
        rows.append(row("9", "oversubscribed/8 ranks ÷ 2 ranks on 2 cores", cfg,
                        "tokens/s ratio (best steps)", ratio,
                        notes="no target: dp 8 repeats the whole AdamW update on every replica (8× "
                        "the update work of one rank on the same 2 cores) and allreduces over 8 "
                        "ranks; whether waiting wastes cores is what the polled ÷ blocking rows "
                        "measure"))
    for rid, what, target in (("n8.pp4", "pp 4 × dp 2", True), ("n8", "dp 8", False)):
        if rid in got and rid + ".blocking" in got:
            ratio = got[rid]["tps"] / got[rid + ".blocking"]["tps"]
            rows.append(row(f"9.polling.{rid}", f"oversubscribed/polled ÷ blocking waits, {what}",
                            cfg, "tokens/s ratio (best steps)", ratio,
                            target=Target(">", 1.0) if target else None,
                            notes="MPIGPT2_BLOCKING_WAITS=1 switches every wait to MPICH's "
                            "busy-spinning Waitall (diagnostic only); " + (
                                "waiting stages spin on the cores the computing stage needs"
                                if target else "in pure data parallelism every rank waits in "
                                "the same collective, where spinning costs little")))
    return rows


BENCHES = [("0", bench_check), ("1", bench_single), ("2", bench_mfu), ("3", bench_slicing),
           ("4", bench_dp), ("5", bench_schedules), ("6", bench_param_memory),
           ("7", bench_zero), ("8", bench_autotune), ("9", bench_oversubscribed)]


# ------------------------------------------------------------------------------------------------
# output

def fmt_value(r):
    v = r["value"]
    if v is None:
        return "—"
    if r["metric"].startswith("MFU"):
        return f"{100 * v:.1f} %"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_markdown(path, rows, machine, mline, meta):
    m = machine
    lines = [
        f"# mpigpt2 benchmarks ({'quick' if meta['quick'] else 'full'} mode)",
        "",
        f"Run {meta['date']}, {meta['wall_s']:.0f} s wall. `python bench/run.py"
        f"{' --quick' if meta['quick'] else ''}"
        + "".join(f" --env {k}={v}" for k, v in meta["extra_env"].items())
        + "`. All values are measured side by side in this "
        "one run; ratios, not absolute numbers, are what the targets judge.",
        "",
        f"**Machine:** {m['cpu']['model_name']} (family/model {m['cpu']['family_model']}, "
        f"avx2 {m['cpu']['avx2']}, avx512f {m['cpu']['avx512f']}), {m['cores']} cores "
        f"({m['cores_usable']} usable); Python {m['python']}; numpy {m['numpy']} with "
        f"{m['blas']['internal_api']} {m['blas']['version']} (kernels {m['blas']['architecture']}, "
        f"{m['blas']['threading_layer']}); torch {m['torch']}; {m['mpi']}; environment "
        + ", ".join(f"{k}={v}" for k, v in m["env"].items()) + f"; load average at start "
        + ", ".join(f"{x:.2f}" for x in m["loadavg_start"]) + ".",
        "",
        f"**Other load:** the machine is shared; other processes used on average "
        f"{100 * meta['others_cpu_frac_mean']:.0f} % (max {100 * meta['others_cpu_frac_max']:.0f} %) "
        "of the CPUs while the sub-benchmarks ran (from /proc/stat minus this suite's own CPU "
        "time; column *others' CPU*, and `details.others_cpu_frac` in results.json). "
        f"Before each measurement the suite waited for that load to fall below "
        f"{100 * QUIET_THRESHOLD:.0f} % (at most {meta['quiet']['budget_s']:.0f} s in total; "
        f"waited {meta['quiet']['waited_s']:.0f} s).",
        "",
        "| # | name | config | metric | value | target | met | notes | others' CPU | machine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        oc = r["details"].get("others_cpu_frac")
        cells = [r["id"], r["name"], r["config"], r["metric"], fmt_value(r), r["target"] or "",
                 met, r["notes"], "" if oc is None else f"{100 * oc:.0f} %", mline]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")
                                       for c in cells) + " |")
    lines.append("")
    from mpigpt2.formats.atomic import atomic_write_text
    atomic_write_text(path, "\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small configs, ≲ 2 minutes")
    ap.add_argument("--out", default=os.path.join(BENCH_DIR, "results.json"),
                    help="results JSON (results.md is written next to it)")
    ap.add_argument("--quiet-budget", type=float, default=None,
                    help="seconds the run may spend in total waiting for other load to drop "
                         "before measurements (default 150, 0 with --quick)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every sub-benchmark (repeatable), e.g. "
                         "MALLOC_MMAP_THRESHOLD_=33554432; recorded in results.md")
    ap.add_argument("--only", default=None, help="comma-separated row groups, e.g. 0,3,6")
    args = ap.parse_args()
    machine = machine_info()
    mline_short = (f"{machine['cpu']['model_name']} ×{machine['cores']}, numpy {machine['numpy']}"
                   f", {machine['blas']['internal_api']} {machine['blas']['version']} "
                   f"[{machine['blas']['architecture']}]")
    log(machine_line(machine))
    # the run's context, passed to every row group: sizes, --env, the quiet-wait budget
    ctx = {"quick": args.quick, "env": dict(kv.split("=", 1) for kv in args.env),
           "quiet": {"waited_s": 0.0}}
    ctx["quiet"]["budget_s"] = args.quiet_budget if args.quiet_budget is not None else (
        0.0 if args.quick else 150.0)
    if args.quick:
        ctx.update(pipe_model={"L": 4, "NH": 8, "C": 512, "V": 8192}, pipe_B=4, pipe_T=128)
    else:
        # two stages of equal cost (5 layers + embedding | 4 layers + a 6400-row head), so that
        # row 3 measures slicing, not partition imbalance (its ideal 16/9 assumes equal stages)
        ctx.update(pipe_model={"L": 9, "NH": 8, "C": 512, "V": 6400}, pipe_B=8, pipe_T=256)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for gid, fn in BENCHES:
        if only and gid not in only:
            continue
        log(f"row group {gid}: {fn.__name__}")
        try:
            rows += fn(ctx)
        except Exception as e:  # a bug in the suite itself must not lose the other rows
            import traceback
            traceback.print_exc()
            rows.append(error_row(gid, fn.__name__, "", f"{type(e).__name__}: {e}"))
    full_line = machine_line(machine)
    fracs = [r["details"].get("others_cpu_frac") for r in rows
             if r["details"].get("others_cpu_frac") is not None]
    meta = {"quick": args.quick, "extra_env": ctx["env"], "quiet": ctx["quiet"], "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - T0,
            "others_cpu_frac_mean": sum(fracs) / len(fracs) if fracs else 0.0,
            "others_cpu_frac_max": max(fracs) if fracs else 0.0}
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for r in rows:  # every row names the machine and the run it came from
        r["machine"] = full_line
        r["run"] = meta
    from mpigpt2.formats.atomic import atomic_write_text
    atomic_write_text(out, json.dumps(rows, indent=1, default=str))
    md = os.path.splitext(out)[0] + ".md"
    write_markdown(md, rows, machine, mline_short, meta)
    log(f"wrote {out} and {md} ({len(rows)} rows, {meta['wall_s']:.0f} s)")
    bad = [r for r in rows if r["met"] is False]
    for r in bad:
        log(f"  target not met: {r['id']} {r['name']}: {fmt_value(r)} (target {r['target']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

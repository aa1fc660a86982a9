"""`--slice-tokens auto`: time a pipeline stage's slices on this CPU and pick the fastest k.

For each candidate k (a divisor of T, from T down to slices of MIN_SLICE tokens) one micro-batch
of b sequences runs through the bottleneck stage — the dearest by the layout's cost model, built
for the real model shape with random weights — split into n = T/k slices; each slice's forward
and backward are timed (best of a few repetitions, on the run's BLAS threads). The predicted step
time is TeraPipe's form

    M·Σ_j t_j + (pp−1)·max_j t_j        (t_j: forward + backward of slice j on that stage)

the bottleneck stage computes M·n slices, and the pipeline fills and drains over pp−1 of its
slowest slices. Small k shortens the fill/drain but loses matmul efficiency and adds per-slice
overhead; attention makes late slices dearer. Profiles are cached in ~/.cache/mpigpt2/slices.json
keyed by model shape, stage, b, T, M, pp, dtype, threads and CPU, so a rerun does not measure.
"""

import json
import math
import os
import time

import numpy as np

from mpigpt2.base.machine import compute_key
from mpigpt2.parallel import costs

MIN_SLICE = 8         # tokens: below this a slice is mostly Python and message overhead
MAX_SLICES = 64       # slices per micro-batch (the parity matrix tests up to T/16)
REPS = 2              # timed repetitions per candidate (best of); one warm-up pass before
MIN_SECONDS = 0.3     # ...and more (up to MAX_REPS) while they took less than this each
MAX_REPS = 8
PATIENCE = 2          # stop after this many consecutive candidates slower than the best

_clock = time.perf_counter  # the timer; tests replace it to prove a cached profile is reused


def parse_slice_tokens(text):
    """argparse type of --slice-tokens: a token count, comma-separated slice lengths
    (96,64,48,48: a tuple), or 'auto'."""
    if text == "auto":
        return text
    try:
        if "," in text:
            return tuple(int(x) for x in text.split(","))
        return int(text)
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError(f"expected a number of tokens, comma-separated slice "
                                         f"lengths or 'auto', got {text!r}") from None


def cache_path():
    root = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
    return os.path.join(root, "mpigpt2", "slices.json")


def candidates(T, min_tokens=MIN_SLICE, max_slices=MAX_SLICES):
    """Divisors k of T, largest first, with k ≥ min_tokens (or k = T) and T/k ≤ max_slices."""
    return [k for k in range(T, 0, -1) if T % k == 0 and T // k <= max_slices
            and (k >= min_tokens or k == T)]


def bottleneck_stage(cfg, T, stage_layers):
    """The stage with the largest estimated cost (layers, plus embedding / logits + loss)."""
    cost = costs.stage_costs(cfg, T, stage_layers)
    return max(range(len(stage_layers)), key=lambda s: (cost[s], s))


def measure(cfg, spec, b, T, ks, dtype=np.float32, threads=1, reps=REPS, done=None):
    """Per-slice forward+backward seconds {k: [t_0 .. t_{n-1}]} of one micro-batch of b rows
    on a stage of spec, for each k in ks (in order). done(k, times) -> True stops early."""
    from threadpoolctl import threadpool_limits
    from mpigpt2.model.params import init_params
    from mpigpt2.model.stage import Stage
    dtype = np.dtype(dtype)
    st = Stage(cfg, spec, dtype)
    init_params(cfg, spec, st.p, seed=0)
    rng = np.random.default_rng(0)
    C = cfg.channels
    tokens = rng.integers(0, cfg.vocab_size, (b, T))  # (b, T)
    acts = rng.standard_normal((b, T, C)).astype(dtype)  # (b, T, C)
    grads = (rng.standard_normal((b, T, C)) * 1e-3).astype(dtype)  # (b, T, C)

    def one_pass(k):
        n = T // k
        f, bw = [0.0] * n, [0.0] * n
        st.begin(0, b, T)
        for j in range(n):
            x = (tokens[:, j * k:(j + 1) * k] if spec.first else
                 np.ascontiguousarray(acts[:, j * k:(j + 1) * k].reshape(b * k, C)))
            tgt = tokens[:, j * k:(j + 1) * k] if spec.last else None
            t0 = _clock()
            st.forward(0, j * k, x, tgt, 1.0 / (b * T))
            f[j] = _clock() - t0
        for j in reversed(range(n)):
            dout = None if spec.last else \
                np.ascontiguousarray(grads[:, j * k:(j + 1) * k].reshape(b * k, C))
            t0 = _clock()
            st.backward(0, j * k, dout)
            bw[j] = _clock() - t0
        return [x + y for x, y in zip(f, bw)]

    out = {}
    with threadpool_limits(threads, user_api="blas"):
        one_pass(ks[0])  # warm-up: buffers, caches, BLAS threads
        for k in ks:  # the first round decides how small k goes
            out[k] = one_pass(k)
            if done is not None and done(k, out[k]):
                break
        # further rounds interleave the candidates, so a burst of load elsewhere on the
        # machine hits all of them alike; each slice keeps its best time
        rounds, t0 = 1, _clock()
        while rounds < reps or (rounds < MAX_REPS and _clock() - t0 < MIN_SECONDS * len(out)):
            for k in out:
                out[k] = [min(a, b) for a, b in zip(out[k], one_pass(k))]
            rounds += 1
    return out


def profile_key(cfg, spec, b, T, M, pp, dtype, threads):
    shape = cfg.as_dict()
    return (f"L{shape['num_layers']} NH{shape['num_heads']} C{shape['channels']} "
            f"V{shape['vocab_size']} Vp{shape['padded_vocab_size']} maxT{shape['max_seq_len']}"
            f" | stage layers {spec.l1 - spec.l0} first={spec.first} last={spec.last}"
            f" | b{b} T{T} M{M} pp{pp} | {np.dtype(dtype).name} {threads} thread(s)"
            f" | {compute_key()}")


def _read_cache(path):
    """The cache as a dict; anything unreadable (not a small regular file, not JSON, not an
    object) counts as empty: it is only a cache, rebuilt by measuring."""
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > 1 << 24:
            return {}
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _cached_profile(data, key):
    """{k: [seconds per slice]} of one cache entry when every k is a positive integer and
    every time a finite positive number, else {} (a damaged entry is measured again)."""
    entry = data.get(key)
    if not isinstance(entry, dict):
        return {}
    try:
        hit = {int(k): [float(t) for t in v] for k, v in entry.items()}
    except (TypeError, ValueError, OverflowError):
        return {}
    ok = all(k > 0 and v and all(math.isfinite(t) and t > 0 for t in v) for k, v in hit.items())
    return hit if ok else {}


def profile(cfg, spec, b, T, M, pp, dtype=np.float32, threads=1, ks=None, cache=True):
    """({k: per-slice seconds}, 'cache' | 'measured'): the cached profile of this key, or a
    new measurement (candidates largest k first, stopping once PATIENCE candidates in a row
    predict slower than the best), which is then cached."""
    ks = list(ks or candidates(T))
    key = profile_key(cfg, spec, b, T, M, pp, dtype, threads)
    path = cache_path()
    if cache:
        hit = _cached_profile(_read_cache(path), key)
        if ks[0] in hit and set(hit) <= set(ks):
            return hit, "cache"
    best, worse = [float("inf")], [0]

    def done(k, t):
        pred = costs.pipeline_seconds(t, M, pp)
        worse[0] = worse[0] + 1 if pred >= best[0] else 0
        best[0] = min(best[0], pred)
        return worse[0] >= PATIENCE

    prof = measure(cfg, spec, b, T, ks, dtype, threads, done=done)
    if cache:
        try:
            from mpigpt2.formats.atomic import atomic_write_text
            data = _read_cache(path)
            data[key] = {str(k): v for k, v in prof.items()}
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=1))
        except OSError:
            pass  # a read-only home: measure again next time
    return prof, "measured"


def choose(cfg, layout, B, T, dtype=np.float32, threads=1, cache=True):
    """(k, info) for layout (its slice_tokens is ignored): the candidate with the smallest
    predicted step time. At pp = 1 slicing only adds overhead: k = T, nothing measured."""
    pp, M = layout.pp, layout.microbatches
    b = B // (layout.dp * M)
    if pp == 1:
        return T, {"slice_tokens": T, "source": "pp=1: no slicing", "candidates": []}
    s = bottleneck_stage(cfg, T, layout.stage_layers)
    prof, source = profile(cfg, layout.spec(s), b, T, M, pp, dtype, threads, cache=cache)
    rows = []
    for k in sorted(prof, reverse=True):
        t = prof[k]
        rows.append({"k": k, "n": T // k,
                     "predicted_step_ms": round(costs.pipeline_seconds(t, M, pp) * 1e3, 3),
                     "slice_ms_sum": round(sum(t) * 1e3, 3),
                     "slice_ms_max": round(max(t) * 1e3, 3)})
    best = min(rows, key=lambda r: (r["predicted_step_ms"], -r["k"]))
    info = {"slice_tokens": best["k"], "predicted_step_ms": best["predicted_step_ms"],
            "source": source, "stage": s, "stage_layers": layout.stage_layers[s],
            "rows_per_microbatch": b, "threads": threads, "candidates": rows}
    return best["k"], info


def describe(info):
    """One line for the log: the choice, its prediction and the other candidates."""
    if not info["candidates"]:
        return f"autotune: k={info['slice_tokens']} ({info['source']})"
    others = ", ".join(f"k={r['k']}: {r['predicted_step_ms']:.1f}" for r in info["candidates"])
    n = next(r["n"] for r in info["candidates"] if r["k"] == info["slice_tokens"])
    return (f"autotune: k={info['slice_tokens']} ({n} slices), predicted "
            f"{info['predicted_step_ms']:.1f} ms/step of compute on stage {info['stage']} "
            f"[{info['source']}]; candidates (ms) {others}")


def agree(comm, cfg, layout, B, T, dtype=np.float32, threads=1, cache=True, waiter=None):
    """Resolve `--slice-tokens auto` on every rank: rank 0 measures (the others poll-wait,
    leaving it the cores), then broadcasts. Returns (layout with slice_tokens set, info)."""
    from dataclasses import replace
    if layout.pp == 1:
        k, info = choose(cfg, layout, B, T, dtype, threads, cache)
        return replace(layout, slice_tokens=k), info
    info = None
    if comm.Get_rank() == 0:
        _, info = choose(cfg, layout, B, T, dtype, threads, cache)
    from mpigpt2.parallel.waiting import Waiter
    waiter = waiter or Waiter()
    # poll: a blocking bcast would spin on the cores rank 0 is measuring with; a long
    # measurement is not a stall (but it is bounded by the wait timeout)
    Waiter(stall_seconds=float("inf"), timeout=waiter.timeout).wait(
        [comm.Ibarrier()], "setup", lambda: "rank 0's --slice-tokens auto measurement")
    with waiter.bounded("the autotune result (bcast)"):  # set-up metadata: pickle is fine
        info = comm.bcast(info, root=0)
    return replace(layout, slice_tokens=info["slice_tokens"]), info

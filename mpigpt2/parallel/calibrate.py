"""What this CPU computes, measured once and cached: the inputs of the planner's compute model
(docs/design.md#the-planner).

For a model shape, the forward and the backward of three pieces are timed on the real stage
code at a few token counts m (one micro-batch slice of m tokens, rows × tokens):
- "layer": one transformer block (a middle stage of one layer);
- "head": the final LayerNorm, the logits and the loss (a last stage of no layers);
- "embed": the token and position embedding (a first stage of no layers);
each on 1 BLAS thread and, where the machine has two cores, on 2 (the thread scaling).
Plus the optimizer: seconds per parameter of one AdamW update. The planner interpolates
seconds per token in log m between the measured points and scales beyond them by tokens;
costs.ComputeModel turns that into the seconds of every schedule action.
Cached in ~/.cache/mpigpt2/calibration.json keyed by model shape, dtype and CPU.
"""

import json
import math
import os
import time

import numpy as np

from mpigpt2.base.machine import compute_key

TOKENS = (16, 64, 256, 1024)   # token counts measured per piece
CAL_T = 64                     # ...as rows of CAL_T tokens: attention over few keys, which
                               # the "attention" entry then prices separately
MAX_FLOP = 4e11                # skip a point whose layer forward+backward exceeds this
REPS = 1                       # best of (after one warm-up pass), per round
ROUNDS = 3                     # whole rounds, best of
OPT_PARAMS = 1 << 24           # parameters of the timed AdamW update

_clock = time.perf_counter


def cache_path():
    root = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache"))
    return os.path.join(root, "mpigpt2", "calibration.json")


def key(cfg, dtype):
    s = cfg.as_dict()
    return (f"NH{s['num_heads']} C{s['channels']} V{s['vocab_size']} Vp{s['padded_vocab_size']}"
            f" | {np.dtype(dtype).name} | {compute_key()}")


def _pieces(cfg):
    from mpigpt2.model.params import StageSpec
    L = cfg.num_layers
    return {"layer": StageSpec(0, 1, False, False), "head": StageSpec(L, L, False, True),
            "embed": StageSpec(0, 0, True, False)}


def _time_piece(cfg, spec, m, dtype, reps, T=CAL_T):
    """Best-of-reps (forward, backward) seconds of one slice of m tokens (m/T rows of T)
    through spec."""
    from mpigpt2.model.params import init_params
    from mpigpt2.model.stage import Stage
    st = Stage(cfg, spec, dtype)
    init_params(cfg, spec, st.p, seed=0)
    T = min(T, m, cfg.max_seq_len)
    b = max(1, m // T)
    rng = np.random.default_rng(0)
    C = cfg.channels
    tokens = rng.integers(0, cfg.vocab_size, (b, T))  # (b, T)
    x = tokens if spec.first else rng.standard_normal((b * T, C)).astype(dtype)  # (b·T, C)
    dout = None if spec.last else (rng.standard_normal((b * T, C)) * 1e-3).astype(dtype)
    best = [math.inf, math.inf]
    for _ in range(reps + 1):  # (the first pass warms buffers and BLAS up)
        st.begin(0, b, T)
        t0 = _clock()
        st.forward(0, 0, x, tokens if spec.last else None, 1.0 / (b * T))
        t1 = _clock()
        st.backward(0, 0, dout)
        t2 = _clock()
        best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
    return best


def _flop(cfg, m):
    """Forward + backward FLOPs of a layer and of the head over m tokens (the larger)."""
    return 3 * m * max(24 * cfg.channels ** 2, 2 * cfg.channels * cfg.padded_vocab_size)


def attention_flops(b, k, keys, C):
    """Forward FLOPs of the attention products (QKᵀ and att·V) of one layer over b rows × k
    queries attending to `keys` keys on average."""
    return 4 * b * k * keys * C


def measure(cfg, dtype=np.float32, reps=REPS, rounds=ROUNDS):
    """{piece: {threads: {m: [forward s, backward s]}}, "attention": {threads: [forward,
    backward seconds per attention FLOP]}, "adamw": s per parameter}: the best of `rounds`
    whole rounds, so a burst of load elsewhere on the machine hits one round, not every
    repetition of one number."""
    got = [_measure_round(cfg, dtype, reps) for _ in range(rounds)]
    return _best(got)


def _best(values):
    """Elementwise min of equally shaped nested dicts / lists / numbers."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _best([v[k] for v in values]) for k in first}
    if isinstance(first, list):
        return [_best([v[i] for v in values]) for i in range(len(first))]
    return min(values)


def _measure_round(cfg, dtype, reps):
    """One round of measure()."""
    from threadpoolctl import threadpool_limits
    from mpigpt2.model.optim import AdamW
    out = {"attention": {}}
    threads = (1, 2) if (os.cpu_count() or 1) >= 2 else (1,)
    ms = [m for m in TOKENS if m == TOKENS[0] or _flop(cfg, m) <= MAX_FLOP]
    for name, spec in _pieces(cfg).items():
        out[name] = {}
        for t in threads:
            with threadpool_limits(t, user_api="blas"):
                out[name][str(t)] = {str(m): _time_piece(cfg, spec, m, dtype, reps) for m in ms}
    # attention: the layer over one long row against the same tokens in short rows
    m, spec = ms[-1], _pieces(cfg)["layer"]
    T = min(m, cfg.max_seq_len)
    extra = attention_flops(m // T, T, (T + 1) / 2, cfg.channels) - attention_flops(
        m // CAL_T, CAL_T, (CAL_T + 1) / 2, cfg.channels)
    for t in threads:
        with threadpool_limits(t, user_api="blas"):
            long = _time_piece(cfg, spec, m, dtype, reps, T=T)
        short = out["layer"][str(t)][str(m)]
        out["attention"][str(t)] = [max(a - b, 1e-9) / max(extra, 1) for a, b in zip(long,
                                                                                   short)]
    rng = np.random.default_rng(0)
    p = rng.standard_normal(OPT_PARAMS).astype(dtype)
    g = rng.standard_normal(OPT_PARAMS).astype(dtype)
    opt = AdamW(OPT_PARAMS, dtype, weight_decay=0.1)
    best = math.inf
    for t in range(1, 2 * reps + 2):  # (the first touches the moments' pages)
        t0 = _clock()
        opt.step(p, g, t, 1e-4)
        best = min(best, _clock() - t0) if t > 1 else best
    out["adamw"] = best / OPT_PARAMS
    return out


def _valid(entry):
    try:
        ok = entry["adamw"] > 0 and all(
            len(v) == 2 and all(x > 0 and math.isfinite(x) for x in v)
            for piece in ("layer", "head", "embed") for per_m in entry[piece].values()
            for v in per_m.values())
        return ok and "1" in entry["layer"] and "1" in entry["attention"]
    except (KeyError, TypeError, AttributeError):
        return False


def load(cfg, dtype=np.float32, cache=True, refresh=False):
    """(the calibration of cfg on this CPU, 'cache' | 'measured'); refresh: measure anew
    and replace the cached one."""
    from mpigpt2.parallel.autotune import _read_cache
    path, k = cache_path(), key(cfg, dtype)
    if cache and not refresh:
        entry = _read_cache(path).get(k)
        if _valid(entry):
            return entry, "cache"
    entry = measure(cfg, dtype)
    if cache:
        try:
            from mpigpt2.formats.atomic import atomic_write_text
            data = _read_cache(path)
            data[k] = entry
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps(data, indent=1))
        except OSError:
            pass  # a read-only home: measure again next time
    return entry, "measured"

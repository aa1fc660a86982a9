"""The machine's float32 matmul peak per core, behind MFU: probed once, cached on disk."""

import json
import os
import time

import numpy as np

from mpigpt2.base.machine import cpu_name
from mpigpt2.formats.atomic import atomic_write_text

CACHE = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")),
                     "mpigpt2", "peak.json")



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
    key = f"{cpu_name()}|numpy {np.__version__}|{os.environ.get('OPENBLAS_CORETYPE', '')}"
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
        atomic_write_text(CACHE, json.dumps({"key": key, "gflops": g}))
    except OSError:
        pass
    return g, "probe"

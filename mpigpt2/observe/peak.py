"""The machine's float32 matmul peak per core, behind MFU: probed once, cached on disk.

The cache ($XDG_CACHE_HOME/mpigpt2/peak.json, else ~/.cache/mpigpt2/peak.json) is not user
input: whatever is there that is not a regular file holding a JSON object with this machine's
key and a plausible peak (finite, 0 < GFLOP/s < MAX_GFLOPS) is ignored, and a fresh probe
replaces it atomically. A cache that cannot be read or written never stops a run.
"""

import json
import math
import os
import time

import numpy as np

from mpigpt2.base.errors import UserError
from mpigpt2.base.files import open_regular
from mpigpt2.base.machine import compute_key
from mpigpt2.formats.atomic import atomic_write_text


def _cache_home():
    """$XDG_CACHE_HOME when it is an absolute path (the XDG rule: relative ones are ignored),
    else ~/.cache."""
    xdg = os.path.expanduser(os.environ.get("XDG_CACHE_HOME", ""))
    return xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache")


CACHE = os.path.join(_cache_home(), "mpigpt2", "peak.json")
MAX_CACHE_BYTES = 4096  # the cache is one short line
MAX_GFLOPS = 1e6  # per core; a float32 core does ~100: anything near this is not a measurement


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


def plausible(g):
    """A peak worth using: a real number (not a bool), finite, 0 < g < MAX_GFLOPS."""
    if not isinstance(g, (int, float)) or isinstance(g, bool):
        return False
    try:
        g = float(g)
    except OverflowError:
        return False
    return math.isfinite(g) and 0 < g < MAX_GFLOPS


def cache_key():
    return compute_key()


def read_cache(key, path=None):
    """The cached peak for key, or None when the cache is absent, unreadable, not a regular
    file, malformed, for another machine or implausible."""
    path = CACHE if path is None else path
    try:
        with open_regular(path, "peak cache") as f:
            data = f.read(MAX_CACHE_BYTES + 1)
        if len(data) > MAX_CACHE_BYTES:
            return None
        cached = json.loads(data.decode("utf-8"))
    except (UserError, OSError, ValueError, RecursionError):  # (UnicodeDecodeError included)
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    g = cached.get("gflops")
    return float(g) if plausible(g) else None


def write_cache(key, g, path=None):
    """Replace the cache atomically (a FIFO, a symlink or junk there is replaced, not
    followed); a cache that cannot be written is left alone."""
    path = CACHE if path is None else path
    if not plausible(g):
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "gflops": float(g)}))
    except OSError:
        pass


def peak_gflops_per_core(override=None):
    """(GFLOP/s per core, source): --peak-gflops, else the cached probe, else a new probe."""
    if override:
        return float(override), "--peak-gflops"
    key = cache_key()
    g = read_cache(key)
    if g is not None:
        return g, f"cached probe ({CACHE})"
    g = probe_peak_gflops()
    write_cache(key, g)
    return g, "probe"

"""The machine as benchmarks and caches name it. Imports nothing heavy: base/blas.py uses it
before numpy loads."""

import os
import platform


def cpuinfo_fields(text=None):
    """The first processor's fields in /proc/cpuinfo (or in text): {"vendor_id": ..., "cpu
    family": ..., "model name": ..., "flags": ...}; {} when it cannot be read."""
    if text is None:
        try:
            with open("/proc/cpuinfo") as f:
                text = f.read()
        except OSError:
            return {}
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name():
    """The CPU model (from /proc/cpuinfo), keying cached measurements."""
    return cpuinfo_fields().get("model name") or platform.processor() or "unknown"


def compute_key():
    """What cached speed measurements are keyed by: the CPU, numpy, and the BLAS kernels numpy
    runs (OPENBLAS_CORETYPE as OpenBLAS read it when it loaded: base/blas.py)."""
    import numpy as np
    return (f"{cpu_name()} | numpy {np.__version__} | "
            f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')}")


def shm_free():
    """Bytes free in /dev/shm (where MPICH puts shared windows); None where it is absent."""
    import os
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_room(free=None):
    """The /dev/shm room node-shared dp may count on: free bytes (default this node's
    shm_free(); a job passes the least of every node's), capped by MPIGPT2_SHM_BYTES (a
    container's 64 MiB /dev/shm, in tests; it can only lower the figure)."""
    import os
    from mpigpt2.base.errors import UserError
    free = shm_free() if free is None else free
    env = os.environ.get("MPIGPT2_SHM_BYTES")
    if not env:
        return free
    try:
        cap = int(float(env))
    except ValueError:
        raise UserError(f"MPIGPT2_SHM_BYTES={env!r} is not a number of bytes") from None
    return cap if free is None else min(cap, free)


def available_memory_bytes():
    """Bytes this node can still give: MemAvailable, capped by the cgroup's limit (Slurm and
    containers set one). MPIGPT2_NODE_MEMORY (bytes) overrides it, e.g. to plan for a node
    other than this one. None if unknown."""
    import os
    env = os.environ.get("MPIGPT2_NODE_MEMORY")
    if env:
        return int(float(env))
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                         "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f, open(used) as g:
                lim, cur = f.read().strip(), g.read().strip()
            if lim.isdigit() and int(lim) < 1 << 60:
                found.append(int(lim) - int(cur))
        except (OSError, ValueError):
            continue
    return min(found) if found else None

"""The machine as benchmarks and caches name it."""

import platform


def cpu_name():
    """The CPU model (from /proc/cpuinfo), keying cached measurements."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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

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

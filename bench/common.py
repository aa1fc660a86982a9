"""Shared helpers of the benchmark suite: machine description, result lines, timed subprocesses."""

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

from mpigpt2.base import blas as kernel_choice
from mpigpt2.base.machine import cpuinfo_fields

MARK = "BENCH_JSON "  # a sub-benchmark's result line on stdout starts with this
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
# one BLAS/OpenMP thread per process unless a benchmark asks otherwise
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def emit(obj):
    """Print one result line for run.py to collect."""
    print(MARK + json.dumps(obj), flush=True)


def parse_lines(text):
    return [json.loads(line[len(MARK):]) for line in text.splitlines() if line.startswith(MARK)]


def summary(times):
    """best / median / all of a list of step times (seconds)."""
    return {"best_s": min(times), "median_s": statistics.median(times), "steps_s": list(times)}


def cpu_model():
    info = cpuinfo_fields()
    flags = info.get("flags", "").split()
    return {
        "model_name": info.get("model name", platform.processor() or "unknown"),
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
    }


def machine_info():
    """What the numbers were measured on: CPU, cores, numpy/BLAS, torch, MPI, BLAS env vars."""
    import numpy as np
    from threadpoolctl import threadpool_info
    blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
    b = blas[0] if blas else {}
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": {k: b.get(k) for k in ("internal_api", "version", "architecture",
                                      "threading_layer", "num_threads")},
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        "blas_choice": kernel_choice.CHOICE,
        "loadavg_start": os.getloadavg(),
    }
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        import mpi4py
        from mpi4py import MPI
        info["mpi"] = f"mpi4py {mpi4py.__version__}, " + MPI.Get_library_version().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - machine line only
        info["mpi"] = f"unavailable ({e})"
    return info


def machine_line(m):
    """One short line naming the machine, for every table row."""
    c = m["cpu"]
    blas = m["blas"]
    env = ",".join(f"{k}={v}" for k, v in m["env"].items() if v)
    return (f"{c['model_name']} (fam/model {c['family_model']}{', avx512f' if c['avx512f'] else ''})"
            f" ×{m['cores']} cores; numpy {m['numpy']}; {blas.get('internal_api')} "
            f"{blas.get('version')} [{blas.get('architecture')}]; {env}")


def machine_short(m):
    """The machine in a few words, for the machine column of results.md."""
    blas = m["blas"]
    return (f"{m['cpu']['model_name']} ×{m['cores']}, numpy {m['numpy']}, "
            f"{blas['internal_api']} {blas['version']} [{blas['architecture']}]")


def run_cmd(cmd, timeout, env_extra=None, log=None):
    """Run cmd in its own process group; kill the whole group on timeout.

    Returns (returncode or None on timeout, stdout, stderr, seconds).
    """
    env = dict(os.environ)
    env.update(ONE_THREAD_ENV)
    env.update(env_extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    if log:
        log(f"$ {' '.join(cmd)}")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        rc = None
        err += f"\n[bench] timed out after {timeout:.0f} s; process group killed"
    return rc, out, err, time.perf_counter() - t0


def _kill_group(p):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def python():
    """The interpreter running the suite (the venv's)."""
    return sys.executable


def mpiexec():
    """mpiexec next to the interpreter (the venv's MPICH), else the one on PATH."""
    cand = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return cand if os.path.exists(cand) else "mpiexec"

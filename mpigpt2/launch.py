"""Local launcher: `python -m mpigpt2.launch -n 8 [--hostfile F] -- [train flags]`.

Runs N ranks with the mpiexec of the MPI that mpi4py uses (the venv's pip wheel, or $MPIEXEC /
the one on PATH for a system MPI), adds what that MPI needs to oversubscribe a small machine
(Open MPI: --oversubscribe, and --allow-run-as-root as root), and sets BLAS/OpenMP threads per
rank to cores / ranks-per-host (at least 1), unless --threads says otherwise.

`python -m mpigpt2.launch slurm [--dry-run] -- [train flags]` is the mode for one attempt of a
Slurm batch job (what slurm/train.sbatch runs; mpigpt2/slurmjob.py).
"""

import argparse
import functools
import os
import shutil
import subprocess
import sys


def find_mpiexec():
    """$MPIEXEC, else the venv's mpiexec beside this interpreter, else the one on PATH."""
    if os.environ.get("MPIEXEC"):
        return os.environ["MPIEXEC"]
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    found = shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        sys.exit("error: no mpiexec found: install the MPI wheel (pip install mpich) or put a "
                 "system MPI's mpiexec on PATH / in $MPIEXEC")
    return found


@functools.lru_cache(maxsize=None)
def flavour(mpiexec):
    """'openmpi', 'mpich' or 'unknown', from `mpiexec --version`."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    low = out.lower()
    if "open mpi" in low or "open-mpi" in low or "openrte" in low:
        return "openmpi"
    if "hydra" in low or "mpich" in low:
        return "mpich"
    return "unknown"


def mpiexec_cmd(n, hostfile=None):
    """The launcher prefix for n ranks on this machine (or the hosts in hostfile)."""
    exe = find_mpiexec()
    cmd = [exe, "-n", str(n)]
    kind = flavour(exe)
    if kind == "openmpi":
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
        if hostfile:
            cmd += ["--hostfile", hostfile]
    elif hostfile:
        cmd += ["-f", hostfile]
    return cmd


def thread_env(n_local, threads=None):
    """Environment with one (or cores / ranks) BLAS and OpenMP threads per rank."""
    t = threads or max(1, (os.cpu_count() or 1) // max(1, n_local))
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(t)
    return env


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["slurm"]:  # (imported only here: the local launcher needs none of it)
        from mpigpt2 import slurmjob
        return slurmjob.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m mpigpt2.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--ranks", type=int, default=8, help="number of MPI ranks")
    p.add_argument("--hostfile", default=None, help="hosts for a multi-host run (no Slurm)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads per rank")
    p.add_argument("--module", default="mpigpt2.train", help="python module each rank runs")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the module's flags")
    args = p.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.ranks < 1:
        return usage("-n must be ≥ 1")
    if args.threads is not None and args.threads < 1:
        return usage(f"--threads must be ≥ 1, got {args.threads}")
    hosts = _count_hosts(args.hostfile) if args.hostfile else 1
    if hosts is None:
        return usage(f"--hostfile {args.hostfile}: not a readable text file of host names")
    local = max(1, args.ranks // hosts)
    cmd = mpiexec_cmd(args.ranks, args.hostfile) + [sys.executable, "-m", args.module] + rest
    env = thread_env(local, args.threads)
    print(" ".join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    # become mpiexec: Ctrl-C, SIGTERM and SIGUSR1 then reach it (and through it the ranks,
    # which checkpoint and exit with status 3) instead of killing a Python parent first
    os.execvpe(cmd[0], cmd, env)


def usage(message):
    print(f"error: {message}", file=sys.stderr)
    return 2


def _count_hosts(path):
    """Hosts listed in a hostfile (at least 1), or None if it is not a readable text file."""
    try:
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return max(1, sum(1 for line in f if line.strip() and
                              not line.lstrip().startswith("#")))
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())

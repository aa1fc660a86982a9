"""A bound on MPI_Init itself: a peer stopped (SIGSTOP) or dead while the job starts leaves
every other rank inside MPI_Init, before any MPI call of ours could poll or abort, and holding
the GIL (so no Python thread can act). A forked watchdog process therefore keeps the time:
started before mpi4py initialises MPI, released once the command's main() runs; on expiry it
prints one line and kills its parent, and the MPI launcher then ends the rest of the job.
(docs/design.md#waiting)"""

import argparse
import math
import os
import select
import signal

DEFAULT_SECONDS = 1800.0
_guard = {}


def wait_timeout(argv, default=DEFAULT_SECONDS):
    """--wait-timeout from argv if it is a usable number, else default (the full check of
    the flags comes later, with the one-line errors)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--wait-timeout", default=None)
    try:
        v = float(p.parse_known_args(argv)[0].wait_timeout)
    except (TypeError, ValueError, SystemExit):
        return default
    return v if math.isfinite(v) and v > 0 else default


def launcher_rank():
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return os.environ[key]
    return "?"


def guard_init(argv):
    """Kill this process with one line on stderr unless cancel_init_guard() is called within
    --wait-timeout seconds. The watchdog is a forked child holding only a pipe (and stderr):
    the pipe's end of file, when the parent cancels or dies, makes it exit at once."""
    seconds = wait_timeout(argv)
    try:
        r, w = os.pipe()
        parent, pid = os.getpid(), os.fork()
    except OSError:
        return  # no fork here: MPI_Init stays unguarded
    if pid == 0:
        try:
            os.closerange(3, r)
            os.closerange(r + 1, 1 << 16)
            if not select.select([r], [], [], seconds)[0]:
                os.write(2, f"[rank {launcher_rank()}] gave up (--wait-timeout) after "
                            f"{seconds:.0f}s waiting for MPI_Init: a peer process is stopped "
                            f"or dead\n".encode())
                os.kill(parent, signal.SIGKILL)
        finally:
            os._exit(0)
    os.close(r)
    _guard.update(fd=w, pid=pid)


def cancel_init_guard():
    """Release the watchdog (closing the pipe ends it) and reap it."""
    fd, pid = _guard.pop("fd", None), _guard.pop("pid", None)
    if fd is not None:
        os.close(fd)
        os.waitpid(pid, 0)

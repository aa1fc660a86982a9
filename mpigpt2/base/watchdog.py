"""Each rank's sentinel, a forked process that outlives what the rank itself cannot report.

1. A bound on MPI_Init: a peer stopped (SIGSTOP) or dead while the job starts leaves every
   other rank inside MPI_Init, before any MPI call of ours could poll or abort, and holding
   the GIL (so no Python thread can act). The sentinel keeps the time; on expiry it prints one
   line and kills its rank, and the MPI launcher then ends the rest of the job.
2. A rank killed outright (kill -9, the OOM killer): the sentinel names it.
3. A job that ends without MPI_Finalize (a rank killed, our MPI_Abort, a rank stuck in
   MPI_Init) leaves MPI's own named segments in /dev/shm, holding memory until a reboot: the
   sentinel removes them once no process maps them.
(docs/design.md#waiting)"""

import argparse
import atexit
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time

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


MARKER_SECONDS = 5.0
STALE_SETTLE_SECONDS = 1.0  # a lost rank's peers are killed by the launcher within this
STALE_WAIT_SECONDS = 10.0  # and a file some rank still maps is looked at again until then
INIT_POLL_SECONDS = 0.5  # how often the sentinel reads its rank's maps while MPI_Init runs
# the shared-memory files MPI libraries name in /dev/shm and unlink only when they finalise
# (MPICH, its UCX transport, Open MPI's vader / sm): the only files a sentinel ever removes
MPI_SHM_PREFIXES = ("mpich_shm_", "mpich_vci_", "ucx_shm_posix_", "vader_segment.",
                    "sm_segment.")


def guard_init(argv):
    """Start this rank's sentinel: `python -m mpigpt2.base.watchdog FD PID SECONDS RANK`, a
    separate small process holding only the read end of a pipe (and stderr).

    Until init_done() it bounds MPI_Init: nothing within --wait-timeout seconds, and it prints
    one line and kills this process. After init_done() it watches: if this process vanishes
    without expected_exit() (kill -9, the OOM killer, a segfault) it names the rank on stderr,
    which the launcher forwards before its own banner (that names only a PID). The other ranks
    cannot say it: MPICH kills them within ~0.1 s. (An exec'd program, not a bare fork, so
    that it is told apart from the ranks in ps and /proc; in its own session, so that the
    launcher's process-group kill does not take it along.)"""
    seconds = wait_timeout(argv)
    try:
        r, w = os.pipe()
        subprocess.Popen([sys.executable, "-m", "mpigpt2.base.watchdog", str(r),
                          str(os.getpid()), repr(seconds), launcher_rank(), job_key()],
                         pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        return  # no sentinel here: MPI_Init stays unguarded
    os.close(r)
    _guard.update(fd=w)
    atexit.register(expected_exit)


def _sentinel(r, parent, seconds, rank, job):
    segments = set()  # MPI's named /dev/shm files the rank maps (MPI_Init makes them early)
    deadline = time.monotonic() + seconds
    while not select.select([r], [], [], min(INIT_POLL_SECONDS, seconds))[0]:
        segments |= _shm_files(parent)  # known even if MPI_Init never returns
        if time.monotonic() >= deadline:
            _write(f"[rank {rank}] gave up (--wait-timeout) after {seconds:.0f}s waiting for "
                   f"MPI_Init: a peer process is stopped or dead")
            os.kill(parent, signal.SIGKILL)
            _remove_stale(segments)
            return
    said = os.read(r, 1)
    while said == b"I":  # MPI is up: watch until the end
        segments |= _shm_files(parent)
        said = os.read(r, 1)
    if said == b"X":  # MPI_Finalize follows and removes MPI's files itself
        return
    if said == b"A":  # our MPI_Abort follows: the ranks the launcher then kills are no loss
        _first_loss(job)
    elif _first_loss(job):  # (a rank the launcher killed after it: quiet)
        _write(f"[rank {rank}] died without a word (pid {parent} on {socket.gethostname()}): "
               f"killed by a signal (kill -9, the OOM killer) or crashed in native code; the "
               f"MPI launcher ends the job")
    _remove_stale(segments)


def _shm_files(pid):
    """The MPI segments process pid maps: named (not yet unlinked) files directly in /dev/shm
    with a name of MPI_SHM_PREFIXES. Nothing else (a venv or data kept in /dev/shm, say)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f
                     if " /dev/shm/" in line and not line.rstrip().endswith("(deleted)")}
    except (OSError, IndexError):
        return set()
    return set(filter(_is_mpi_segment, paths))


def _is_mpi_segment(path):
    """A file directly in /dev/shm with a name of MPI_SHM_PREFIXES."""
    return (os.path.dirname(path) == "/dev/shm"
            and os.path.basename(path).startswith(MPI_SHM_PREFIXES))


def _remove_stale(paths, settle=STALE_SETTLE_SECONDS, wait=STALE_WAIT_SECONDS):
    """After a rank ended without MPI_Finalize: once the launcher has ended the rest of the
    job (settle), remove the job's MPI segments that no process maps any more (they would
    stay in /dev/shm, holding memory, until a reboot). A file some process still maps is
    looked at again until `wait` more seconds have passed, then kept; several sentinels may
    race to remove one file."""
    paths = set(filter(_is_mpi_segment, paths))
    if not paths:
        return
    time.sleep(settle)
    deadline = time.monotonic() + wait
    while True:
        paths = {p for p in paths if os.path.exists(p)}  # (finalised, or another removed it)
        mapped = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            mapped |= _shm_files(pid)
        for path in paths - mapped:
            try:
                os.unlink(path)
            except OSError:
                pass
        paths &= mapped
        if not paths or time.monotonic() >= deadline:
            return
        time.sleep(INIT_POLL_SECONDS)


def _write(line):
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass  # (the launcher is gone)


def _first_loss(job):
    """True for the first sentinel of this job on this node to see its rank vanish: the
    launcher kills the other ranks right after (by process group: the sentinels run in their
    own sessions to survive it), and their sentinels must stay quiet. The marker is removed
    again after MARKER_SECONDS."""
    path = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp",
                        f"mpigpt2-lost-{job}")
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError:
        return False
    if os.fork() == 0:  # remove the marker later, without delaying the report
        time.sleep(MARKER_SECONDS)
        try:
            os.unlink(path)
        finally:
            os._exit(0)
    return True


def job_key():
    """This node's share of the job: the launcher process that started the ranks here (its
    pid and start time, so a reused pid is another job)."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    return f"{ppid}-{start}"


def _say(mark):
    fd = _guard.get("fd")
    if fd is not None:
        try:
            os.write(fd, mark)
        except OSError:
            pass


def init_done():
    """MPI_Init has returned: the sentinel stops timing and starts watching."""
    _say(b"I")


def expected_exit(aborting=False):
    """This process is about to end on purpose (a normal exit, an error already reported, an
    MPI_Abort): the sentinel leaves quietly. aborting: our MPI_Abort follows, and the sentinel
    claims the job's one loss report on this node first, so that the sentinels of the ranks
    the launcher then kills on this node stay quiet too (on other nodes the first of them
    still reports)."""
    _say(b"A" if aborting else b"X")
    fd = _guard.pop("fd", None)
    if fd is not None:
        os.close(fd)


if __name__ == "__main__":  # the sentinel process
    _sentinel(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5])

"""Each rank's sentinel, a separate process that outlives what the rank itself cannot report.

1. A bound on MPI_Init: a peer stopped (SIGSTOP) or dead while the job starts leaves every
   other rank inside MPI_Init, before any MPI call of ours could poll or abort, and holding
   the GIL (so no Python thread can act). The sentinel keeps the time; on expiry it prints one
   line and kills its rank, and the MPI launcher then ends the rest of the job.
2. A rank killed outright (kill -9, the OOM killer): the sentinel names it, unless the rank
   or another on this node already told that its end is on purpose (our MPI_Abort, a hard
   exit after a second signal): then the ranks the launcher kills are no loss.
3. A job that ends without MPI_Finalize (a rank killed, our MPI_Abort or hard exit, a rank
   stuck in MPI_Init) leaves MPI's own named segments in /dev/shm, holding memory until a
   reboot: the sentinel removes those its rank mapped (files directly in /dev/shm named as in
   MPI_SHM_PREFIXES, nothing else) once no process maps them, 1 s after, looking again for
   up to 10 s more.
(docs/design.md#waiting)"""

import argparse
import atexit
import contextlib
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
MARKER_PREFIX = "mpigpt2-lost-"  # + the job key: <launcher pid>-<its start time>
MARKER_STALE_SECONDS = 6 * MARKER_SECONDS  # a marker this old, of an ended job, is litter
STALE_SETTLE_SECONDS = 1.0  # a lost rank's peers are killed by the launcher within this
STALE_WAIT_SECONDS = 10.0  # and a file some rank still maps is looked at again until then
INIT_POLL_SECONDS = 0.5  # how often the sentinel reads its rank's maps while MPI_Init runs
SHM_DIR = "/dev/shm"
MPICH_SHM_KINDS = ("shm", "vci")  # MPICH's own segments: mpich_<kind>_<hash of the job>_<n>
# the shared-memory files MPI libraries name in /dev/shm and unlink only when they finalise
# (MPICH, its UCX transport, Open MPI's vader / sm): the only files a sentinel ever removes
MPI_SHM_PREFIXES = tuple(f"mpich_{kind}_" for kind in MPICH_SHM_KINDS) + (
    "ucx_shm_posix_", "vader_segment.", "sm_segment.")


def guard_init(argv):
    """Start this rank's sentinel: `python -m mpigpt2.base.watchdog FD PID SECONDS RANK JOB`, a
    separate small process holding only the read end of a pipe (and stderr).

    Until init_done() it bounds MPI_Init: nothing within --wait-timeout seconds, and it prints
    one line and kills this process. After init_done() it watches: if this process vanishes
    without expected_exit() (kill -9, the OOM killer, a segfault) it names the rank on stderr,
    which the launcher forwards before its own banner (that names only a PID). The other ranks
    cannot say it: MPICH kills them within ~0.1 s. (An exec'd program, not a bare fork, so
    that it is told apart from the ranks in ps and /proc; in its own session, so that the
    launcher's process-group kill does not take it along.)"""
    seconds, job = wait_timeout(argv), job_key()
    try:
        r, w = os.pipe()
        subprocess.Popen([sys.executable, "-m", "mpigpt2.base.watchdog", str(r),
                          str(os.getpid()), repr(seconds), launcher_rank(), job],
                         pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError:
        return  # no sentinel here: MPI_Init stays unguarded
    os.close(r)
    _guard.update(fd=w, job=job)
    atexit.register(expected_exit)


def _sentinel(r, parent, seconds, rank, job):
    _sweep_markers()
    segments = set()  # MPI's named /dev/shm files the rank maps (MPI_Init makes them early)
    deadline = time.monotonic() + seconds
    while not select.select([r], [], [], min(INIT_POLL_SECONDS, seconds))[0]:
        segments |= _shm_files(parent)  # known even if MPI_Init never returns
        if time.monotonic() >= deadline:
            _write(f"[rank {rank}] gave up (--wait-timeout) after {seconds:.0f}s waiting for "
                   f"MPI_Init: a peer process is stopped or dead")
            _first_loss(job)  # (the ranks the launcher now kills are no loss)
            os.kill(parent, signal.SIGKILL)
            _remove_stale(segments)
            return
    said = os.read(r, 1)
    while said == b"I":  # MPI is up: watch until the end
        segments |= _shm_files(parent)
        said = os.read(r, 1)
    if said == b"X":  # MPI_Finalize follows and removes MPI's files itself
        return
    if said == b"A":  # an end without MPI_Finalize; the rank made the loss marker already
        _remove_later(_marker(job))
    elif _first_loss(job):  # (a rank the launcher killed after it: quiet)
        _write(f"[rank {rank}] died without a word (pid {parent} on {socket.gethostname()}): "
               f"killed by a signal (kill -9, the OOM killer) or crashed in native code; the "
               f"MPI launcher ends the job")
    _remove_stale(segments)


def _shm_files(pid):
    """The MPI segments process pid maps: named (not yet unlinked) files directly in /dev/shm
    with a name of MPI_SHM_PREFIXES. Nothing else (a venv or data kept in /dev/shm, say)."""
    try:  # (a mapped file's name may be any bytes: kept as the str os.unlink takes back)
        with open(f"/proc/{pid}/maps", encoding=sys.getfilesystemencoding(),
                  errors="surrogateescape") as f:
            paths = {line.split(None, 5)[5].strip() for line in f
                     if f" {SHM_DIR}/" in line and not line.rstrip().endswith("(deleted)")}
    except (OSError, IndexError, ValueError):
        return set()
    return set(filter(_is_mpi_segment, paths))


def _is_mpi_segment(path):
    """A file directly in /dev/shm with a name of MPI_SHM_PREFIXES."""
    return (os.path.dirname(path) == SHM_DIR
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
    if not _claim(job):
        return False
    _remove_later(_marker(job))
    return True


def _marker(job):
    """The job's loss marker on this node: whoever makes it first (O_EXCL) has the one report."""
    return os.path.join(_marker_dir(), f"{MARKER_PREFIX}{job}")


def _marker_dir():
    return SHM_DIR if os.path.isdir(SHM_DIR) else "/tmp"


def _claim(job):
    """Make the job's loss marker on this node; True if this call made it."""
    try:
        os.close(os.open(_marker(job), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except OSError:
        return False


def _sweep_markers():
    """Remove the loss markers of ended jobs: their timed removal (_remove_later) can be
    killed with the job (Slurm ends a step's whole cgroup), which left an empty marker behind
    for good. A marker goes once it is MARKER_STALE_SECONDS old and its launcher no longer
    runs (or cannot be known: the key's start time is 0), so a job that is still reporting
    keeps its marker. Run by every sentinel as it starts; never fails."""
    folder, now = _marker_dir(), time.time()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(MARKER_PREFIX)]
    except OSError:
        return
    for name in names:
        pid, _, start = name[len(MARKER_PREFIX):].partition("-")
        if not (pid.isdigit() and start.isdigit()):
            continue  # (not a marker of ours)
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):  # (gone already: another sentinel was first)
            if (os.stat(path).st_mtime < now - MARKER_STALE_SECONDS
                    and (start == "0" or _start_time(pid) != start)):
                os.unlink(path)


def _remove_later(path):
    """Remove path after MARKER_SECONDS, in a child (the caller goes on at once)."""
    if os.fork() == 0:
        time.sleep(MARKER_SECONDS)
        try:
            os.unlink(path)
        finally:
            os._exit(0)


def job_key():
    """This node's share of the job: the launcher process that started the ranks here (its
    pid and start time, so a reused pid is another job)."""
    ppid = os.getppid()
    return f"{ppid}-{_start_time(ppid) or '0'}"


def _start_time(pid):
    """Process pid's start time (clock ticks after boot, /proc/PID/stat's 22nd field) as a
    string; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # (the name in it may be any bytes)
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


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


def expected_exit(finalize=True):
    """This process is about to end on purpose: the sentinel leaves quietly. finalize: the
    exit runs MPI_Finalize (a normal exit, an error already agreed and reported), which
    removes MPI's files. Otherwise (our MPI_Abort, a hard exit) this claims the job's loss
    report on this node first, before the launcher kills the other ranks here, so that their
    sentinels stay quiet too (on other nodes the first of them still reports), and the
    sentinel removes the marker later and MPI's segments once nothing maps them."""
    if _guard.get("fd") is not None and not finalize:
        _claim(_guard["job"])
    _say(b"X" if finalize else b"A")
    fd = _guard.pop("fd", None)
    if fd is not None:
        os.close(fd)


if __name__ == "__main__":  # the sentinel process
    _sentinel(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5])

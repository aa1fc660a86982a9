"""Helpers shared by the test folders: running commands with a bound, the MPI launcher, the
train command line, watching and killing process trees."""

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = Path(os.environ.get("MPIGPT2_TEXT") or REPO.parent / "shared/data/tinyshakespeare.txt")
PY = sys.executable


def run(cmd, cwd=None, timeout=240, env=None):
    """Run cmd in its own process group; kill the group on timeout. Returns CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    e.update(env or {})
    p = subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def mpiexec(n):
    """The launcher of the MPI that mpi4py runs on (the venv's, unless MPIEXEC is set)."""
    from mpigpt2.launch import mpiexec_cmd
    return mpiexec_cmd(n)


def train_cmd(shards, out, *extra):
    train, val = shards
    return [PY, "-m", "mpigpt2.train", "--train-data", str(train), "--val-data", str(val),
            "--out-dir", str(out), "--batch-size", "4", "--seq-len", "32", *extra]


def descendants(pid):
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    out = []
    for k in map(int, kids.split()):
        out += [k] + descendants(k)
    return out


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def rank_pid(proc, rank, marker):
    """The pid of MPI rank `rank` among proc's descendants whose command line holds marker."""
    for pid in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and marker.encode() in cmdline(pid):
            return pid
    return None


def mapped_shm():
    """Names of the /dev/shm files some live process maps (another job's are in use)."""
    names = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                names.update(os.path.basename(x.split()[-1]) for x in f if "/dev/shm/" in x)
        except OSError:
            pass
    return names


def stale_shm(before, timeout=20.0):
    """The /dev/shm files that appeared since `before` (a listing) and no live process maps,
    once they are gone or after timeout seconds (a dead job's sentinels remove MPI's segments
    1-11 s after the launcher ends it and their own marker after 5 s, base/watchdog.py):
    empty when the job left nothing behind."""
    t0 = time.monotonic()
    while True:
        stale = set(os.listdir("/dev/shm")) - set(before) - mapped_shm()
        if not stale or time.monotonic() - t0 > timeout:
            return stale
        time.sleep(0.1)


def start(command, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(command, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc, timeout=120):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("timed out")
    return proc.returncode, out, err


def digest(root):
    """Every entry under root: its kind and, for regular files, the sha256 of its bytes."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                out.append((p, "link", os.readlink(p)))
            elif stat.S_ISREG(st_.st_mode):
                out.append((p, "file", hashlib.sha256(open(p, 'rb').read()).hexdigest()))
            else:
                out.append((p, stat.S_IFMT(st_.st_mode)))
    return out


def two_cores():
    """A command prefix pinning a process tree to two of this machine's CPUs (a 2-core node,
    whatever the machine has: for the busy-ranks default)."""
    return ["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))]

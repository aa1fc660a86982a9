"""The sentinel's /dev/shm clean-up (base/watchdog.py) touches MPI's own segments only: a venv,
a library or data a user keeps in /dev/shm is never removed, mapped or not; an MPI segment is
removed once no process maps it, and kept while one does."""

import mmap
import os
import shutil
import subprocess
import time

import pytest

from mpigpt2.base import watchdog


@pytest.fixture
def shm_files():
    """Makes files in /dev/shm (some in subdirectories); removes them all again after."""
    tops = set()

    def make(rel):
        path = os.path.join("/dev/shm", rel)
        tops.add(os.path.join("/dev/shm", rel.split("/")[0]))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * mmap.PAGESIZE)
        return path
    yield make
    for top in tops:
        if os.path.isdir(top):
            shutil.rmtree(top)
        elif os.path.exists(top):
            os.unlink(top)


def mapped(path):
    """An open, shared mapping of path (held until the returned object is closed)."""
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 0)


def test_only_mpi_segments_directly_in_dev_shm_count(shm_files):
    tag = f"t{os.getpid()}"
    mpi = [shm_files(f"mpich_shm_{tag}_0"), shm_files(f"ucx_shm_posix_{tag}")]
    other = [shm_files(f"venv-{tag}/lib/libmpi.so"), shm_files(f"data-{tag}.bin"),
             shm_files(f"d-{tag}/mpich_shm_{tag}_0")]
    maps = [mapped(p) for p in mpi + other]
    try:
        assert watchdog._shm_files(os.getpid()) >= set(mpi)
        assert not watchdog._shm_files(os.getpid()) & set(other)
    finally:
        for m in maps:
            m.close()


def test_a_mapped_file_whose_name_is_not_utf8(shm_files):
    """A mapped file with a name that is not UTF-8 is read (it ended the sentinel) and an MPI
    segment so named can still be removed by the name read."""
    tag = f"t{os.getpid()}"
    user = shm_files(f"data-{tag}-\udcff.bin")  # (os.fsencode: the byte 0xff)
    mpi = shm_files(f"mpich_shm_{tag}_\udcff")
    maps = [mapped(p) for p in (user, mpi)]
    try:
        assert watchdog._shm_files(os.getpid()) & {user, mpi} == {mpi}
    finally:
        for m in maps:
            m.close()
    watchdog._remove_stale({mpi}, settle=0, wait=0)
    assert not os.path.exists(mpi) and os.path.exists(user)


def test_remove_stale_removes_unmapped_mpi_segments_only(shm_files):
    tag = f"t{os.getpid()}"
    gone, held = shm_files(f"mpich_shm_{tag}_0"), shm_files(f"mpich_vci_{tag}_0")
    user = shm_files(f"data-{tag}.bin")
    marker = shm_files(f"mpigpt2-lost-{tag}")  # (the loss marker: removed by its own timer)
    m = mapped(held)
    try:
        watchdog._remove_stale({gone, held, user, marker}, settle=0, wait=0.6)
        assert not os.path.exists(gone)
        assert os.path.exists(held)  # some process still maps it: kept
        assert os.path.exists(user) and os.path.exists(marker)  # not MPI's: never touched
    finally:
        m.close()
    watchdog._remove_stale({held}, settle=0, wait=0)
    assert not os.path.exists(held)


def test_a_marker_outlives_only_the_launcher_it_names(shm_files):
    """A loss marker of an ended job (its timed removal was killed with the job) is swept by
    the next sentinel once it is old; one of a running launcher, a fresh one (its job may
    still be reporting) or one of another name is kept."""
    done = subprocess.Popen(["true"])
    done.wait()  # a pid that no longer runs
    me, prefix = os.getpid(), watchdog.MARKER_PREFIX
    old = time.time() - watchdog.MARKER_STALE_SECONDS - 5

    def marker(key, aged=True):
        path = shm_files(f"{prefix}{key}")
        if aged:
            os.utime(path, (old, old))
        return path
    kept = [marker(f"{me}-{watchdog._start_time(me)}"),  # this launcher runs
            marker(f"{done.pid}-12345", aged=False), marker(f"{me}-0", aged=False),  # fresh
            marker(f"t{me}")]  # not a job key
    swept = [marker(f"{done.pid}-12346"),  # its launcher is gone
             marker(f"{me}-1"),  # this pid, another start time: a reused pid
             marker(f"{done.pid}-0")]  # its launcher could not be known
    watchdog._sweep_markers()
    assert all(os.path.exists(p) for p in kept)
    assert not any(os.path.exists(p) for p in swept)


def test_start_time_of_a_process_whose_name_is_not_utf8(tmp_path):
    """The sweep reads /proc/PID/stat of any pid a marker names: a process name that is not
    UTF-8 must not end the sentinel (it did, with a UnicodeDecodeError)."""
    exe = os.path.join(os.fsencode(tmp_path), b"\xff\xfe)x")
    os.symlink(b"/bin/sleep", exe)
    p = subprocess.Popen([exe, "5"])
    try:
        with open(f"/proc/{p.pid}/stat", "rb") as f:
            assert b"\xff\xfe)x" in f.read()  # (the name as the test meant it)
        start = watchdog._start_time(p.pid)
        assert start.isdigit() and int(start) > 0
    finally:
        p.kill()
        p.wait()

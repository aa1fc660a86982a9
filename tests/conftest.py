"""Shared fixtures; under MPI, a failing rank prints its report and aborts the whole job."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT = Path(os.environ.get("MPIGPT2_TEXT") or REPO.parent / "shared/data/tinyshakespeare.txt")


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """tinyshakespeare prepared once per session: (train path, val path)."""
    from mpigpt2.prepare import prepare_tinyshakespeare
    d = tmp_path_factory.mktemp("data")
    prepare_tinyshakespeare(str(d), str(TEXT))
    return d / "tiny_shakespeare_train.bin", d / "tiny_shakespeare_val.bin"


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


def pytest_runtest_makereport(item, call):
    """Under MPI with several ranks, a failure on one rank would leave the others blocked in
    their next collective: print this rank's report and abort the job at once."""
    if call.excinfo is None or call.when == "setup" and call.excinfo.typename == "Skipped":
        return
    if not item.config.getoption("with_mpi", default=False):
        return
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return
    sys.stderr.write(f"\n[rank {comm.Get_rank()}] {item.nodeid} failed ({call.when}):\n"
                     f"{call.excinfo.getrepr(style='short')}\n[rank {comm.Get_rank()}] "
                     f"aborting the MPI job\n")
    from mpigpt2.base.errors import abort
    abort(comm, 1)  # (after a short pause, so the launcher forwards this report first)

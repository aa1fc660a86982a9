"""Shared fixtures; under MPI, a failing rank prints its report and aborts the whole job."""

import shutil
import sys

import mpigpt2  # noqa: F401 - first (mpigpt2/base/blas.py): see below
import pytest

# imported before anything loads numpy, mpigpt2 picks numpy's BLAS kernels here as the trainer
# does, and the trainers a test starts inherit the choice: both sides run the same kernels

from helpers import TEXT


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """tinyshakespeare prepared once per session: (train path, val path)."""
    from mpigpt2.prepare import prepare_tinyshakespeare
    d = tmp_path_factory.mktemp("data")
    prepare_tinyshakespeare(str(d), str(TEXT))
    return d / "tiny_shakespeare_train.bin", d / "tiny_shakespeare_val.bin"


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """mk(name) -> a fresh directory for this module's fixtures, removed when the module ends
    if none of its tests failed (a failure keeps it to look at). The suite writes about 20 GB of
    checkpoints (84 MB each) in all: kept to the end of the session they once filled a CI
    machine's disk (README: Tests)."""
    made, failed = [], request.session.testsfailed

    def mk(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]
    yield mk
    if request.session.testsfailed == failed:
        for d in made:
            shutil.rmtree(d, ignore_errors=True)


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

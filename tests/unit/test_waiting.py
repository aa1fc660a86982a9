"""An error MPI reports for a request a rank waits on (parallel/waiting.py) ends the job with one
line naming the rank and what it waited for, not a traceback (a peer killed while rank 0 of
`prepare` waited for its block printed one). A real MPI error on COMM_SELF stands in for a lost
peer: a message longer than the receive buffer (MPI_ERR_TRUNCATE)."""

import threading

import numpy as np
import pytest
from mpi4py import MPI

from mpigpt2.parallel import waiting


class Aborted(Exception):
    pass


@pytest.fixture
def aborts(monkeypatch):
    """The codes waiting.abort was called with (raising Aborted instead of ending pytest)."""
    codes = []

    def fake(comm, code):
        codes.append(code)
        raise Aborted
    monkeypatch.setattr(waiting, "abort", fake)
    return codes


@pytest.mark.parametrize("first_poll", [True, False])
def test_an_mpi_error_in_a_wait_is_one_line_and_ends_the_job(aborts, capfd, first_poll):
    comm = MPI.COMM_SELF
    big, small = np.arange(8, dtype=np.int32), np.zeros(2, dtype=np.int32)
    reqs = [comm.Irecv(small, 0, 7)]
    if first_poll:  # the message is there before the first test
        send = comm.Isend(big, 0, 7)
    with pytest.raises(Aborted):
        if not first_poll:  # the first test finds nothing; the message comes while it naps
            threading.Timer(0.05, lambda: comm.Send(big, 0, 7)).start()
        waiting.Waiter().wait(reqs, "p2p", lambda: "a block from rank 1")
    if first_poll:
        send.Wait()
    err = capfd.readouterr().err
    assert aborts == [4]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"[rank {MPI.COMM_WORLD.Get_rank()}] MPI error (")
    assert lines[0].endswith("waiting for a block from rank 1"), err
    assert "Traceback" not in err

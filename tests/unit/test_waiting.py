"""An error MPI reports for a request a rank waits on or pokes (parallel/waiting.py) ends the job
with one line naming the rank and what it waited for, not a traceback (a peer killed while
rank 0 of `prepare` waited for its block printed one). A real MPI error on COMM_SELF stands in
for a lost peer: a message longer than the receive buffer (MPI_ERR_TRUNCATE)."""

import time
import types

import numpy as np
import pytest
from mpi4py import MPI

from mpigpt2.parallel import waiting

TAG = 7


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


def too_long_message(when, monkeypatch):
    """A receive of 2 ints on COMM_SELF and the send of 8 that fails it: sent now ('first
    poll'), or at the wait's first nap ('nap'). Returns (receive request, send requests)."""
    comm, big = MPI.COMM_SELF, np.arange(8, dtype=np.int32)
    recv = comm.Irecv(np.zeros(2, dtype=np.int32), 0, TAG)
    sends = []
    if when == "first poll":
        sends.append(comm.Isend(big, 0, TAG))
    else:
        def nap(seconds):  # the wait polled once and found nothing: now the message comes
            if not sends:
                sends.append(comm.Isend(big, 0, TAG))
            time.sleep(seconds)
        # (waiting.py's own name for the time module only: no other code sees the nap)
        monkeypatch.setattr(waiting, "time", types.SimpleNamespace(
            sleep=nap, perf_counter=time.perf_counter))
    return recv, sends


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"[rank {MPI.COMM_WORLD.Get_rank()}] MPI error ("), err
    assert "truncated" in lines[0].lower(), err  # MPI's reason for the failed request itself
    return lines[0]


@pytest.mark.parametrize("when", ["first poll", "nap"])
def test_an_mpi_error_in_a_wait_is_one_line_and_ends_the_job(aborts, capfd, monkeypatch, when):
    recv, sends = too_long_message(when, monkeypatch)
    with pytest.raises(Aborted):
        waiting.Waiter().wait([recv], "p2p", lambda: "a block from rank 1")
    assert len(sends) == 1  # (the nap case napped)
    MPI.Request.Waitall(sends)
    assert aborts == [4]
    assert one_line(capfd.readouterr().err).endswith("waiting for a block from rank 1")


def test_an_mpi_error_in_a_poke_is_one_line_and_ends_the_job(aborts, capfd, monkeypatch):
    """The pokes that progress collectives while a rank computes go through the same check."""
    recv, sends = too_long_message("first poll", monkeypatch)
    with pytest.raises(Aborted):
        for _ in range(1000):  # (MPI may complete the receive at a later poke)
            waiting.Waiter().checked(MPI.Request.Testall, [recv], "allreduce",
                                     lambda: "gradient allreduces")
    MPI.Request.Waitall(sends)
    assert aborts == [4]
    assert one_line(capfd.readouterr().err).endswith("0s waiting for gradient allreduces")

"""Our MPI_Abort (base/errors.py abort): the half-second grace first (the launcher forwards the
reason), then the node's loss report claimed and MPI_Abort, in that order, also when a signal
handler raises during the grace. A peer killed just before is then still named by its own
sentinel, and the ranks the launcher kills after are not (base/watchdog.py)."""

import time

import pytest

from mpigpt2.base import errors, watchdog


class FakeComm:
    def __init__(self, calls):
        self.calls = calls

    def Abort(self, code):
        self.calls.append(("Abort", code))


@pytest.mark.parametrize("interrupted", [False, True])
def test_abort_claims_after_the_grace_and_right_before_mpi_abort(monkeypatch, interrupted):
    calls = []

    def sleep(seconds):
        calls.append(("sleep", seconds))
        if interrupted:  # (prepare turns SIGTERM into KeyboardInterrupt)
            raise KeyboardInterrupt
    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(watchdog, "expected_exit",
                        lambda finalize=True: calls.append(("claim", finalize)))
    if interrupted:
        with pytest.raises(KeyboardInterrupt):  # (MPI_Abort never returns; the fake does)
            errors.abort(FakeComm(calls), 4)
    else:
        errors.abort(FakeComm(calls), 4)
    assert calls == [("sleep", errors.ABORT_GRACE_SECONDS), ("claim", False), ("Abort", 4)]

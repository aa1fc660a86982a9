"""Waiting on MPI requests without stealing a core: poll with a short, growing sleep.

MPICH's blocking waits spin at 100 % CPU; with more ranks than cores they starve the ranks that
compute (docs/design.md#waiting). Every wait in the runtime goes through here, and every MPI
error on our requests is reported here (Waiter.checked / mpi_error).
"""

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from mpi4py import MPI

from mpigpt2.base.errors import abort

SLEEP_START = 2e-5
# Longest nap between polls, in seconds. A pipeline wait (p2p), a barrier or set-up may last a
# whole stage's compute (or rank 0's file writing): nap long and leave the core to the ranks
# that compute. A collective moves its data only while the ranks call into MPI (MPICH copies
# large messages through shared memory in chunks, each waiting for a poll on both sides): nap
# short there. Measured with 8 ranks on 2 cores (gpt2-tiny B=16 T=64): one 1 ms cap for every
# wait gave 990 / 1090 / 930 ms steps at dp 8 / pp 2 / pp 4; these two caps 690 / 1000 / 900;
# MPICH's blocking waits 630 / 1400 / 2450.
SLEEP_MAX = float(os.environ.get("MPIGPT2_POLL_SLEEP_MAX", 1e-3))
SLEEP_MAX_COLLECTIVE = float(os.environ.get("MPIGPT2_POLL_SLEEP_MAX_COLLECTIVE", 1e-4))
DATA_COLLECTIVES = ("allreduce", "allgather")  # the gradient and parameter movers


# diagnostic switch (bench row 9): MPICH's blocking, busy-spinning Waitall instead of polling
BLOCKING = os.environ.get("MPIGPT2_BLOCKING_WAITS") == "1"
TRACED_KINDS = ("allgather",)  # waits the runtime does not trace itself (ZeRO's allgathers)


@dataclass
class Waiter:
    """How this rank waits, and the seconds it spent waiting, by kind (for the step metrics).

    Created once by the command (train, a benchmark, a test) and passed with the grid; set-up
    code that runs before a grid exists makes a default one. stall_seconds: report a wait this
    long (and abort the job if abort); timeout: abort the job after a wait this long (a peer
    died without MPI noticing). trace: callable(kind, description, t0, t1) for TRACED_KINDS.
    """
    stall_seconds: float = 60.0
    abort: bool = False
    timeout: float = 1800.0
    blocking: bool = BLOCKING
    trace: Optional[Callable] = None
    step: Optional[int] = None  # named in stall reports
    seconds: dict = field(default_factory=dict)
    # the MPI_Status objects checked()'s Testall / Waitall / Testsome fill (one per request,
    # reused): a failed request's own error is in its status (MPI_ERR_IN_STATUS); ~0.1 µs a
    # call (4 pending requests: a bare Testall 0.38 µs, through checked() with them 0.49)
    statuses: list = field(default_factory=list, repr=False)

    def take(self):
        """The waiting seconds by kind since the last take()."""
        s, self.seconds = self.seconds, {}
        return s

    def _add(self, kind, dt):
        self.seconds[kind] = self.seconds.get(kind, 0.0) + dt

    def wait(self, reqs, kind="p2p", what=None):
        """Poll reqs (a list of MPI.Request) until all complete; sleep between polls.

        what: a callable returning a description of the awaited messages, printed if the
        wait outlasts stall_seconds (then the wait goes on, or the job aborts if abort).
        """
        if not reqs or self.checked(MPI.Request.Testall, reqs, kind, what):
            return
        t0 = time.perf_counter()
        if self.blocking:  # never in normal runs: no stall report, no timeout
            self.checked(MPI.Request.Waitall, reqs, kind, what, t0)
            self._add(kind, time.perf_counter() - t0)
            return
        nap, warned = SLEEP_START, False
        cap = SLEEP_MAX_COLLECTIVE if kind in DATA_COLLECTIVES else SLEEP_MAX
        while not self.checked(MPI.Request.Testall, reqs, kind, what, t0):
            time.sleep(nap)
            nap = min(2 * nap, cap)
            waited = time.perf_counter() - t0
            if not warned and waited > self.stall_seconds:
                warned = True
                self._report(waited, kind, what, "stalled")
                if self.abort:
                    abort(MPI.COMM_WORLD, 4)
            if waited > self.timeout:  # a peer died without MPI noticing: never hang
                self._report(waited, kind, what, "gave up (--wait-timeout)")
                abort(MPI.COMM_WORLD, 4)
        t1 = time.perf_counter()
        self._add(kind, t1 - t0)
        if self.trace is not None and kind in TRACED_KINDS:
            self.trace(kind, what() if what else kind, t0, t1)

    def checked(self, call, reqs, kind, what=None, t0=None):
        """call(reqs, statuses): an MPI test or wait of this rank's requests (wait()'s polls,
        the pokes that progress nonblocking collectives while a rank computes). An error MPI
        reports for them (a peer process gone, which MPI can notice before the launcher ends
        this rank) ends the job with one line naming what this rank waited for and MPI's
        reason, instead of a traceback of this module. t0: when the wait began (None: now)."""
        try:
            return call(reqs, self.statuses)
        except MPI.Exception as e:
            self.mpi_error(e, kind, what, t0, self.statuses[:len(reqs)])

    def mpi_error(self, e, kind, what, t0=None, statuses=()):
        """Report MPI's error e on one line (with the failed requests' own errors where e
        says they are in their statuses) and abort the job, status 4."""
        in_status = e.Get_error_class() == MPI.ERR_IN_STATUS
        codes = dict.fromkeys(s.Get_error() for s in statuses if in_status)  # (in order, once)
        texts = [MPI.Get_error_string(c) for c in codes
                 if c not in (MPI.SUCCESS, MPI.ERR_PENDING)] or [e.Get_error_string()]
        text = " ".join("; ".join(texts).split())  # (MPICH's error stacks: one line)
        waited = time.perf_counter() - t0 if t0 is not None else 0.0
        self._report(waited, kind, what, f"MPI error ({text})")
        abort(MPI.COMM_WORLD, 4)
        raise e  # (never reached: abort ends the process; tests replace it with a raise)

    @contextlib.contextmanager
    def bounded(self, what):
        """Around a call MPI gives no nonblocking form of (communicator splits, the pickled
        set-up collectives): a watchdog thread aborts the job with this rank and `what` if
        the call outlasts the timeout (a stopped or dead peer), instead of hanging forever."""
        t0 = time.perf_counter()

        def expire():
            self._report(time.perf_counter() - t0, "setup", lambda: what,
                         "gave up (--wait-timeout)")
            hard_exit_later(ABORT_BACKSTOP_SECONDS)
            abort(MPI.COMM_WORLD, 4)
        timer = threading.Timer(self.timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()

    def _report(self, waited, kind, what, verdict):
        desc = what() if what else kind
        rank = MPI.COMM_WORLD.Get_rank()
        print(f"[rank {rank}] {verdict} after {waited:.0f}s waiting for {desc}"
              + (f" at step {self.step}" if self.step is not None else ""),
              file=sys.stderr, flush=True)


ABORT_BACKSTOP_SECONDS = 10.0


def hard_exit_later(seconds, code=4):
    """Exit the process (status code) after `seconds` from a daemon thread, whatever the main
    thread is blocked in: the backstop when MPI's own Abort or Finalize cannot finish."""
    def expire():
        sys.stderr.flush()
        os._exit(code)
    t = threading.Timer(seconds, expire)
    t.daemon = True
    t.start()
    return t

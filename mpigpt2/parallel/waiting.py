"""Waiting on MPI requests without stealing a core: poll with a short, growing sleep.

MPICH's blocking waits spin at 100 % CPU; with more ranks than cores they starve the ranks that
compute (DESIGN.md, "Waiting"). Every wait in the runtime goes through here.
"""

import os
import sys
import time

from mpi4py import MPI

from mpigpt2.errors import abort

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


class WaitStats:
    """Seconds spent waiting, by kind (for the step metrics)."""

    def __init__(self):
        self.seconds = {}

    def add(self, kind, dt):
        self.seconds[kind] = self.seconds.get(kind, 0.0) + dt

    def take(self):
        s, self.seconds = self.seconds, {}
        return s


STATS = WaitStats()
# diagnostic switch (bench row 9): MPICH's blocking, busy-spinning Waitall instead of polling
BLOCKING = os.environ.get("MPIGPT2_BLOCKING_WAITS") == "1"
TRACE = None  # --trace: callable(kind, description, t_start, t_end) for the kinds below
TRACED_KINDS = ("allgather",)  # waits the runtime does not trace itself (ZeRO's allgathers)
STALL = {"seconds": 60.0, "abort": False, "timeout": 1800.0, "step": None}


def wait_all(reqs, kind="p2p", what=None):
    """Poll reqs (a list of MPI.Request) until all complete; sleep between polls.

    what: a callable returning a description of the awaited messages, printed if the wait
    outlasts STALL["seconds"] (then the wait goes on, or the job aborts if STALL["abort"]).
    """
    if not reqs:
        return
    if MPI.Request.Testall(reqs):
        return
    t0 = time.perf_counter()
    if BLOCKING:  # never in normal runs: no stall report, no timeout
        MPI.Request.Waitall(reqs)
        STATS.add(kind, time.perf_counter() - t0)
        return
    nap, warned = SLEEP_START, False
    cap = SLEEP_MAX_COLLECTIVE if kind in DATA_COLLECTIVES else SLEEP_MAX
    while not MPI.Request.Testall(reqs):
        time.sleep(nap)
        nap = min(2 * nap, cap)
        waited = time.perf_counter() - t0
        if not warned and waited > STALL["seconds"]:
            warned = True
            _report(waited, kind, what, "stalled")
            if STALL["abort"]:
                abort(MPI.COMM_WORLD, 4)
        if waited > STALL["timeout"]:  # a peer died without MPI noticing: never hang
            _report(waited, kind, what, "gave up (--wait-timeout)")
            abort(MPI.COMM_WORLD, 4)
    t1 = time.perf_counter()
    STATS.add(kind, t1 - t0)
    if TRACE is not None and kind in TRACED_KINDS:
        TRACE(kind, what() if what else kind, t0, t1)


def _report(waited, kind, what, verdict):
    desc = what() if what else kind
    step = STALL["step"]
    rank = MPI.COMM_WORLD.Get_rank()
    print(f"[rank {rank}] {verdict} after {waited:.0f}s waiting for {desc}"
          + (f" at step {step}" if step is not None else ""), file=sys.stderr, flush=True)

"""Preemption: SIGTERM, SIGUSR1 and SIGINT set a flag that all ranks agree on at step ends
(together with a non-finite loss or gradient norm seen by any rank).

The first signal asks for a checkpoint and a clean exit with EXIT_PREEMPTED ("requeue me", used
by the Slurm scripts); a second signal exits at once. The same signal arriving twice within a
second counts once (srun delivers `scancel --full` signals to each task twice).
(docs/design.md#checkpoints)
"""

import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

from mpigpt2.base.watchdog import expected_exit


EXIT_PREEMPTED = 3
EXIT_DIVERGED = 5  # a non-finite loss or gradient norm: stopped without saving
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_state = {"signal": 0, "at": 0.0}
DUPLICATE_SECONDS = 1.0


def _handler(signum, frame):
    now = time.monotonic()
    if _state["signal"] == signum and now - _state["at"] < DUPLICATE_SECONDS:
        return  # the same signal delivered twice at once (e.g. `scancel --full` via srun)
    if _state["signal"]:
        sys.stderr.write(f"[rank {MPI.COMM_WORLD.Get_rank()}] second signal "
                         f"{signal.Signals(signum).name}: exiting now\n")
        sys.stderr.flush()
        expected_exit(finalize=False)  # (no MPI_Finalize: base/watchdog.py cleans up)
        os._exit(128 + signum)
    _state["signal"], _state["at"] = signum, now


def install():
    for s in SIGNALS:
        signal.signal(s, _handler)


def received():
    return _state["signal"]


def agree(comm, waiter, diverged=False):
    """(the largest signal number any rank received or 0, whether any rank saw a non-finite
    loss or gradient norm): one tiny polled allreduce at every step's end."""
    buf = np.array([_state["signal"], int(bool(diverged))], dtype=np.int64)
    waiter.wait([comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX)], "allreduce",
                lambda: "step-end agreement (signals, non-finite values)")
    return int(buf[0]), bool(buf[1])

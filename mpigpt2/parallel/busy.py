"""Busy and idle ranks (--busy-ranks): a node started with more ranks than it has cores computes
with one rank per core, the rest wait for the end of the run without using a core
(docs/design.md#busy-ranks).

Oversubscribed ranks only time-share the cores: measured on a 2-core node, 8 ranks of the
main job ran a step 1.8x slower than 2 ranks (bench row 14). The busy ranks are the first
ones of each node (the world's rank 0 among them) and form the communicator everything else
of the run uses; the idle ones sleep in a polled broadcast from rank 0 that the busy ranks
send when they are done, carrying the exit status. An idle rank's wait has no time limit of
its own: it ends when the busy ranks end, and a busy rank that fails or stalls ends the whole
job (its own waits are bounded, and the launcher stops every rank when one dies).
"""

import os
import time

import numpy as np
from mpi4py import MPI

IDLE_POLL_SECONDS = 0.2


def usable_cores():
    """CPUs this process may run on (its affinity; the machine's count where unknown)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def split(world, local, mode, grid_given, waiter):
    """(communicator of the busy ranks or None on an idle rank, note or ""). local: the ranks
    of this node. mode auto: one busy rank per core of a node with more ranks than cores,
    unless the grid is given (--pp/--dp); all: every rank."""
    with waiter.bounded("the busy ranks (allgather, Comm_split, set-up)"):
        cores = len(set().union(*local.allgather(usable_cores())))
        here = local.Get_size()
        busy_here = here if mode == "all" or grid_given else min(here, cores)
        busy = local.Get_rank() < busy_here
        total = sum(world.allgather(busy))
        comm = world.Split(0 if busy else MPI.UNDEFINED, world.Get_rank())
    if comm == MPI.COMM_NULL:
        return None, ""
    if total == world.Get_size():
        return comm, ""
    return comm, (f"busy ranks: {total} of {world.Get_size()}, one per core ({cores} on this "
                  f"node): more ranks than cores only time-share them; the others wait "
                  f"(--busy-ranks all computes on every rank)")


def idle(world, waiter):
    """An idle rank's whole run: wait (sleeping) for the busy ranks' exit status."""
    status = np.zeros(1, dtype=np.int64)
    reqs = [world.Ibcast(status, root=0)]
    # (not waiter.wait: its naps are for waits that end soon, and its timeout for one wait)
    while not waiter.checked(MPI.Request.Testall, reqs, "setup",
                             lambda: "the busy ranks' exit status (from rank 0)"):
        time.sleep(IDLE_POLL_SECONDS)
    return int(status[0])


def release(world, status, waiter):
    """Busy ranks, at the end: send rank 0's exit status to the idle ranks."""
    buf = np.array([status or 0], dtype=np.int64)
    waiter.wait([world.Ibcast(buf, root=0)], "setup", lambda: "releasing the idle ranks")

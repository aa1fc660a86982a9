"""Failure handling under MPI: one rank's exception ends the whole job; set-up errors are agreed.

An uncaught exception on any rank prints the rank and traceback and calls Abort, so no rank is
left waiting forever. Bad input is checked on every rank during set-up; the ranks agree on the
outcome so that rank 0 prints one clear line and every rank exits with status 2.
(docs/design.md#waiting)
"""

import signal
import sys
import traceback


from mpigpt2.base.errors import UserError, EXIT_USAGE, abort
from mpigpt2.parallel.waiting import Waiter


def install_excepthook(comm):
    """Abort the job on an uncaught exception when more than one rank runs."""
    if comm.Get_size() == 1:
        return

    def hook(etype, value, tb):
        rank = comm.Get_rank()
        text = "".join(traceback.format_exception(etype, value, tb))
        sys.stderr.write(f"[rank {rank}] uncaught {etype.__name__}: {value}\n{text}"
                         f"[rank {rank}] aborting the MPI job\n")
        sys.stderr.flush()
        abort(comm, 1)

    sys.excepthook = hook


def agree(comm, fn, debug=False, waiter=None):
    """Run fn() on every rank; if it raised UserError anywhere, all ranks exit 2 together.

    Rank 0 prints the message of the lowest failing rank. Other exceptions propagate (and so
    abort the job through the excepthook).
    """
    err = None
    try:
        result = fn()
    except UserError as e:
        if debug:
            traceback.print_exc()
        err, result = str(e), None
    waiter = waiter or Waiter()
    waiter.wait([comm.Ibarrier()], "setup", lambda: "the other ranks' set-up checks")
    with waiter.bounded("the set-up error exchange (allgather)"):  # metadata: pickle is fine
        errors = comm.allgather(err)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        if comm.Get_rank() == 0:
            r, e = failed[0]
            where = f" (rank {r})" if comm.Get_size() > 1 and r != 0 else ""
            print(f"error{where}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # every rank exits 2 on its own: a launcher that ends the others as soon as the first
        # one exits (srun --kill-on-bad-exit) must not turn their 2 into SIGTERM's 143
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(EXIT_USAGE)
    return result

"""User-facing errors: one clear line, exit status 2, no traceback unless --debug."""

import sys

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input the user can fix; the message names the file or flag and how to fix it."""


def fail(msg):
    """Raise a UserError with msg (a one-liner used by validators)."""
    raise UserError(msg)


def run_cli(main, argv=None):
    """Run main(argv); turn a UserError into one line on stderr and exit status 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return main(argv)
    except UserError as e:
        if debug:
            raise
        comm = _mpi_world()
        if comm is not None and comm.Get_size() > 1:
            # raised on this rank alone (set-up errors are agreed and never get here): the
            # other ranks may be waiting for it, so end the whole job instead of hanging
            print(f"error (rank {comm.Get_rank()}): {e}", file=sys.stderr, flush=True)
            abort(comm, EXIT_USAGE)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _mpi_world():
    """COMM_WORLD if this process has initialised MPI, else None (never initialises it)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return None
    return mpi.COMM_WORLD


ABORT_GRACE_SECONDS = 0.5


def abort(comm, code):
    """MPI Abort after a short pause: the launcher forwards a rank's output asynchronously, and
    an immediate Abort can kill the job before the message that says why has reached it."""
    import time
    from mpigpt2.base.watchdog import expected_exit
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        time.sleep(ABORT_GRACE_SECONDS)
    finally:  # (also when a signal handler raises during the grace: the job still ends here)
        # the reason is printed: no sentinel need report a loss. Claimed only now, right
        # before the launcher starts to kill the ranks: a peer killed just before (whose
        # failure may be what brought this rank here) has had the grace to be named by its
        # own sentinel
        expected_exit(finalize=False)
        comm.Abort(code)

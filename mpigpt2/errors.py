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
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)

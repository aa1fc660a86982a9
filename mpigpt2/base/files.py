"""Files given as input or output: inputs must be regular files, checked before anything opens
them (a FIFO, a device or a directory given as a file would block open() or read forever);
output directories must be creatable and writable, checked before any compute."""

import os
import stat
import tempfile

from mpigpt2.base.errors import UserError


def require_regular(path, what):
    """Raise a UserError unless path is an existing regular file (symlinks followed).

    what names the input in the message, e.g. "--model" or "token shard"."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{what} {path} is a directory; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {path} is not a regular file (a FIFO, socket or device); "
                        f"give a regular file")
    return st


def open_regular(path, what, mode="rb", **kw):
    """open() after require_regular, and the file opened is the one checked: O_NONBLOCK keeps a
    FIFO swapped in between the check and the open from blocking, and fstat rechecks it."""
    require_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{what} {path} is not a regular file; give a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **kw)


def check_writable(path, flag):
    """path (a directory, maybe not yet created) can be created and written; nothing made."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    try:
        if not os.path.isdir(p):
            raise OSError
        with tempfile.TemporaryFile(dir=p):  # access() says yes to root even on /proc
            pass
    except OSError:
        raise UserError(f"{flag} {path}: {p} is not a writable directory") from None

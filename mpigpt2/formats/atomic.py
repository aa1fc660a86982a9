"""Atomic writes, the only implementation: a temp file (or directory) beside the target, fsync,
rename, fsync the directory. A reader sees the old data or the new, never a part.
(docs/design.md#checkpoints)"""

import contextlib
import os
import secrets
import shutil
import signal
import threading

# the signals a command turns into an exception (Ctrl-C; prepare's SIGTERM): held back while a
# temp file is created and recorded by its owner, so that no exception falls between the two
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def fsync_dir(path):
    """Make a rename inside `path` durable; some filesystems refuse to open directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_beside(path, suffix=""):
    """A fresh hidden name in path's directory (same filesystem: the rename is atomic)."""
    d = os.path.dirname(os.path.abspath(path))
    return os.path.join(d, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp{suffix}")


@contextlib.contextmanager
def interrupts_held():
    """Hold SIGINT and SIGTERM back for the block: one that arrives meanwhile is recorded and
    raised again as the block ends, when its own handler runs (and its exception, e.g.
    KeyboardInterrupt, is raised there). Python runs a signal's handler right after the system
    call it arrived in, so without this an interrupt can fall between creating a temp file and
    storing its name, and the file is never removed. Done with Python handlers, not the
    thread's signal mask: the kernel gives a process-wide signal to any thread not blocking it
    (BLAS, tqdm and worker threads exist). Outside the main thread it holds nothing (Python
    runs handlers only there). Each handler's restore is registered before it is swapped, so
    a signal raised between two swaps or two restores cannot leave a recorder in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    with contextlib.ExitStack() as stack:
        stack.callback(_raise_again, caught)  # registered first: runs after every restore
        for s in INTERRUPTS:
            old = signal.getsignal(s)
            if old is None or old == signal.SIG_IGN:  # set outside Python, or ignored: as is
                continue
            stack.callback(signal.signal, s, old)
            signal.signal(s, lambda signum, frame: caught.append(signum))
        yield


def _raise_again(caught):
    """Send each recorded signal to this thread again, now that its handler is back: the
    handler runs as for a signal never held (the default action included); one raising does
    not stop the others from being sent."""
    with contextlib.ExitStack() as stack:
        for s in dict.fromkeys(caught):
            stack.callback(signal.raise_signal, s)


class AtomicFile:
    """A binary file written under a temp name; commit() fsyncs and renames it into place,
    abort() drops it. Permissions follow the umask (os.open, not mkstemp's 0600). Used as a
    context manager, an exception aborts. The constructor either returns with the temp file
    open or raises with none on disk (an interrupt during it included)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.tmp = temp_beside(self.path)
        self.f, fd = None, None
        try:
            with interrupts_held():
                fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                self.f = os.fdopen(fd, "wb")
        except BaseException:
            if fd is not None:  # created: it is ours to remove
                with contextlib.suppress(OSError):  # (fdopen may have closed fd already)
                    if self.f is not None:
                        self.f.close()
                    else:
                        os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp)
            raise

    def seal(self):
        """Flush and fsync; the file is complete but still under its temp name."""
        if not self.f.closed:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()

    def commit(self):
        self.seal()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self):
        """Drop the temp file (safe to call more than once)."""
        if not self.f.closed:
            self.f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:  # (a signal during the fsync: the temp file must not stay)
            if os.path.exists(self.tmp):
                self.abort()
            raise


def owned(stack, make):
    """make() (an AtomicFile or an object that holds one) with interrupts held until stack (an
    ExitStack) owns it: any interrupt from then on reaches its __exit__, which drops the temp."""
    with interrupts_held():
        return stack.enter_context(make())


def atomic_write(path, write_fn):
    """Write through write_fn(binary file) so that path holds either the old or the new data."""
    with contextlib.ExitStack() as stack:
        write_fn(owned(stack, lambda: AtomicFile(path)).f)


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def fsync_tree(path):
    """fsync every file directly inside directory `path`, then the directory."""
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(path)


def publish_dir(tmp, final):
    """Rename the finished directory tmp to final. An existing final is moved aside first and
    removed only once the new one is in place; on failure it is put back."""
    fsync_tree(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    old = None
    if os.path.exists(final):
        old = temp_beside(final, ".old")
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not os.path.exists(final):
            os.replace(old, final)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Atomic writes, the only implementation: a temp file (or directory) beside the target, fsync,
rename, fsync the directory. A reader sees the old data or the new, never a part.
(docs/design.md#checkpoints)"""

import contextlib
import os
import secrets
import shutil


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


class AtomicFile:
    """A binary file written under a temp name; commit() fsyncs and renames it into place,
    abort() drops it. Permissions follow the umask (os.open, not mkstemp's 0600). Used as a
    context manager, an exception aborts."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.tmp = temp_beside(self.path)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self.f = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
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


def atomic_write(path, write_fn):
    """Write through write_fn(binary file) so that path holds either the old or the new data."""
    with AtomicFile(path) as af:
        write_fn(af.f)


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

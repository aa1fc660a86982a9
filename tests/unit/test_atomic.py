"""The one atomic writer: a signal at any point leaves the old file and no temp file."""

import contextlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mpigpt2.formats import atomic, shards


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_an_interrupt_while_committing_leaves_no_temp(tmp_path, monkeypatch, where):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def interrupted(*a, **k):
        raise KeyboardInterrupt("signal 15")
    monkeypatch.setattr(atomic.os, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_text(str(target), "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_an_error_while_writing_leaves_no_temp(tmp_path):
    def fail(f):
        f.write(b"part")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic.atomic_write(str(tmp_path / "x.bin"), fail)
    assert os.listdir(tmp_path) == []


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises KeyboardInterrupt here, as prepare's handler does; send() sends one."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, handler)
    yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    signal.signal(signal.SIGTERM, old)


def test_interrupts_held_delivers_at_the_end(sigterm_raises):
    handler = signal.getsignal(signal.SIGTERM)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with atomic.interrupts_held():
            sigterm_raises()
            done.append("after the signal")  # still runs: the signal waits for the block's end
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGTERM) is handler  # and the handler is back


def test_interrupts_held_delivers_every_signal():
    """Ctrl-C and SIGTERM in one held block: both handlers run, though each raises."""
    ran = []

    def handler(signum, frame):
        ran.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic.interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                assert ran == []  # held
        assert sorted(ran) == [signal.SIGINT, signal.SIGTERM]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_interrupts_held_keeps_the_default_action():
    """SIGTERM under SIG_DFL, held: the process still ends by SIGTERM, after the block."""
    code = ("import os, signal\n"
            "from mpigpt2.formats import atomic\n"
            "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
            "with atomic.interrupts_held():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    print('held', flush=True)\n"
            "print('survived', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (-signal.SIGTERM, "held\n")


@pytest.mark.parametrize("how", ["AtomicFile", "atomic_write", "write_shard"])
def test_an_interrupt_as_the_temp_is_created_leaves_none(tmp_path, monkeypatch, sigterm_raises,
                                                         how):
    """The signal arrives inside the open() that creates the temp file: Python would raise it
    right after, before the file's name is stored anywhere."""
    real_open = os.open

    def open_then_signal(path, *a, **k):
        fd = real_open(path, *a, **k)
        if ".tmp" in os.path.basename(path):
            sigterm_raises()
        return fd
    monkeypatch.setattr(atomic.os, "open", open_then_signal)
    target = str(tmp_path / "x.bin")
    with pytest.raises(KeyboardInterrupt):
        if how == "AtomicFile":
            atomic.AtomicFile(target)
        elif how == "atomic_write":
            atomic.atomic_write(target, lambda f: f.write(b"new"))
        else:
            shards.write_shard(target, np.arange(10))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_an_interrupt_while_a_shard_starts_leaves_no_temp(tmp_path, monkeypatch, sigterm_raises):
    """The signal arrives while a shard's header is written: the writer drops its temp."""
    real_fdopen = os.fdopen

    class Tripwire:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            sigterm_raises()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: Tripwire(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        shards.ShardWriter(str(tmp_path / "t_train_000001.bin"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_an_interrupt_before_the_owner_takes_the_temp_leaves_none(tmp_path, sigterm_raises):
    """The signal arrives after the AtomicFile exists but before the ExitStack owns it."""
    def make():
        af = atomic.AtomicFile(str(tmp_path / "x.bin"))
        sigterm_raises()
        return af
    with pytest.raises(KeyboardInterrupt):
        with contextlib.ExitStack() as stack:
            atomic.owned(stack, make)
    assert os.listdir(tmp_path) == []

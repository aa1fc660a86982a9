"""The one atomic writer: a signal at any point leaves the old file and no temp file."""

import os

import pytest

from mpigpt2.formats import atomic


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

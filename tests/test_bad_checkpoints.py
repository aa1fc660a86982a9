"""Malformed checkpoints and resume mismatches: one line naming the file or flag, exit 2,
no traceback, nothing written, earlier checkpoints untouched."""

import json
import shutil

import pytest

from conftest import run
from test_cli import train_cmd

CK = "checkpoints/step_00000002"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shards):
    out = tmp_path_factory.mktemp("saved") / "out"
    r = run(train_cmd(shards, out, "--steps", "2", "--sample-tokens", "0", "--val-steps", "1"))
    assert r.returncode == 0, r.stderr
    return out


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def flip_byte(path, offset=5000):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


CASES = [
    ("no such dir", lambda o: None, ["--resume", "{o}/nowhere"], "no such checkpoint directory"),
    ("no DONE", lambda o: (o / CK / "DONE").unlink(), ["--resume", "{o}/" + CK], "incomplete"),
    ("state not json", lambda o: (o / CK / "state.json").write_text("{oops"), [], "unreadable"),
    ("state foreign", lambda o: (o / CK / "state.json").write_text('{"a": 1}'), [],
     "not a mpigpt2 checkpoint"),
    ("state version", lambda o: edit_json(o / CK / "state.json", lambda d: d.update(version=9)),
     [], "checkpoint version 9"),
    ("state missing key", lambda o: edit_json(o / CK / "state.json", lambda d: d.pop("data")),
     [], "lacks 'data'"),
    ("state huge", lambda o: (o / CK / "state.json").write_text(" " * (2 << 20)), [],
     "implausibly large"),
    ("model truncated", lambda o: (o / CK / "model.bin").write_bytes(
        (o / CK / "model.bin").read_bytes()[:-100]), [], "wrong size"),
    ("adam_v missing", lambda o: (o / CK / "adam_v.bin").unlink(), [], "adam_v.bin is missing"),
    ("adam_m corrupt", lambda o: flip_byte(o / CK / "adam_m.bin"), [], "sha256"),
    ("model foreign", lambda o: flip_byte(o / CK / "model.bin", 0), [], "not an llm.c model"),
    ("other model", lambda o: None, ["--model", "gpt2-124m"], "differs from --model"),
    ("other batch", lambda o: None, ["--batch-size", "8"], "--batch-size 4"),
    ("other seq-len", lambda o: None, ["--seq-len", "16"], "--seq-len 32"),
    ("other data", lambda o: None, ["--train-data", "{val}"], "training data changed"),
    ("other dtype", lambda o: None, ["--dtype", "float64"], "--dtype is float64"),
    ("past the end", lambda o: None, ["--steps", "1"], "beyond --steps 1"),
]


@pytest.mark.parametrize("name,mutate,extra,message", CASES, ids=[c[0] for c in CASES])
def test_bad_resume(tmp_path, shards, saved, name, mutate, extra, message):
    out = tmp_path / "out"
    shutil.copytree(saved, out)
    mutate(out)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    extra = [x.replace("{o}", str(out)).replace("{val}", str(shards[1])) for x in extra]
    r = run(train_cmd(shards, out, "--steps", "4", "--resume", "auto", *extra))
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], r.stderr
    assert "Traceback" not in r.stderr
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # nothing written, earlier checkpoints untouched


@pytest.mark.parametrize("extra,message", [
    (["--checkpoint-every", "-1"], "--checkpoint-every must be ≥ 0"),
    (["--keep-checkpoints", "-2"], "--keep-checkpoints must be ≥ 0"),
    (["--stall-seconds", "0"], "must be > 0"),
    (["--wait-timeout", "-5"], "must be > 0"),
    (["--save", "/proc/x.bin"], "--save"),
])
def test_bad_flags(tmp_path, shards, extra, message):
    r = run(train_cmd(shards, tmp_path / "o", "--steps", "2", *extra))
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, shards):
    r = run(train_cmd(shards, tmp_path / "o", "--steps", "1", "--resume", "auto",
                      "--sample-tokens", "0", "--val-steps", "1"))
    assert r.returncode == 0 and "resumed" not in r.stdout, r.stderr

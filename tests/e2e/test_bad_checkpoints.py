"""Malformed checkpoints and resume mismatches: one line naming the file or flag, exit 2,
no traceback, nothing written, earlier checkpoints untouched."""

import hashlib
import json
import shutil

import pytest

from helpers import run
from helpers import train_cmd

CK = "checkpoints/step_00000002"


@pytest.fixture(scope="module")
def saved(module_tmp, shards):
    out = module_tmp("saved") / "out"
    r = run(train_cmd(shards, out, "--steps", "2", "--sample-tokens", "0", "--val-steps", "1"))
    assert r.returncode == 0, r.stderr
    return out


def edit_json(path, fn, reseal=True):
    """Edit state.json; reseal=True also writes its new sha256 into DONE (as a consistent
    forgery would), so that the checks behind the DONE marker's are reached."""
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))
    if reseal:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        (path.parent / "DONE").write_text(f"{d.get('step')} {sha}\n")


def rename(o, new):
    (o / CK).rename(o / "checkpoints" / new)


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
    ("state step not int", lambda o: edit_json(o / CK / "state.json",
                                               lambda d: d.update(step="2")),
     [], "non-negative integers"),
    ("state files list", lambda o: edit_json(o / CK / "state.json",
                                             lambda d: d.update(files=[])), [], "files must list"),
    ("state file outside", lambda o: edit_json(o / CK / "state.json", lambda d: d["files"].update(
        {"../../escape.bin": d["files"]["model.bin"]})), [], "files must list"),
    ("state file no bytes", lambda o: edit_json(o / CK / "state.json", lambda d: d["files"][
        "adam_m.bin"].pop("bytes")), [], "integer 'bytes'"),
    ("state loader empty", lambda o: edit_json(o / CK / "state.json", lambda d: d["data"].update(
        loader={})), [], "loader's epoch, shard and position"),
    ("state loader position", lambda o: edit_json(o / CK / "state.json", lambda d: d["data"][
        "loader"].update(position=7)), [], "does not fit these shards"),
    ("other data order", lambda o: None, ["--shuffle"], "the data order would change"),
    ("state step edited", lambda o: edit_json(o / CK / "state.json", lambda d: d.update(step=1),
                                              reseal=False), [], "does not match its DONE"),
    ("state lr edited", lambda o: edit_json(o / CK / "state.json", lambda d: d["args"].update(
        lr=1.0), reseal=False), [], "does not match its DONE"),
    ("DONE emptied", lambda o: (o / CK / "DONE").write_text(""), [], "does not match its DONE"),
    ("DONE other step", lambda o: (o / CK / "DONE").write_text("3\n"), [],
     "does not match its DONE"),
    ("dir renamed", lambda o: rename(o, "step_00000003"), [], "not the step its name says"),
    ("state step resealed", lambda o: edit_json(o / CK / "state.json", lambda d: d.update(
        step=1)), [], "not the step its name says"),
    ("state seed text", lambda o: edit_json(o / CK / "state.json", lambda d: d.update(
        seed="abc")), [], "seed must be an integer"),
    ("state lineage bad", lambda o: edit_json(o / CK / "state.json", lambda d: d.update(
        lineage=[["x", 5]])), [], "lineage must be"),
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


def test_changed_hyperparameters_are_named(tmp_path, shards, saved):
    """A resume with another --lr continues (that can be wanted) but says so."""
    out = tmp_path / "out"
    shutil.copytree(saved, out)
    r = run(train_cmd(shards, out, "--steps", "3", "--resume", "auto", "--lr", "5e-4",
                      "--sample-tokens", "0", "--val-steps", "1"))
    assert r.returncode == 0, r.stderr
    assert "changed hyperparameters (--lr 0.0001 -> 0.0005)" in r.stdout, r.stdout


def test_fresh_run_moves_earlier_run_aside(tmp_path, shards, saved):
    """Without --resume, an earlier run's checkpoints, metrics.jsonl and config.json in
    --out-dir are kept (moved to OUT/prev-1), not mixed in or overwritten."""
    out = tmp_path / "out"
    shutil.copytree(saved, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"metrics.jsonl", "config.json"} <= {str(p) for p in before}
    r = run(train_cmd(shards, out, "--steps", "1", "--sample-tokens", "0", "--val-steps", "1"))
    assert r.returncode == 0, r.stderr
    assert "moved them to" in r.stdout
    kept = {p.relative_to(out / "prev-1"): p.read_bytes()
            for p in (out / "prev-1").rglob("*") if p.is_file()}
    assert kept == before
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    r = run(train_cmd(shards, out, "--steps", "1", "--sample-tokens", "0", "--val-steps", "1"))
    assert r.returncode == 0 and (out / "prev-2" / "metrics.jsonl").is_file(), r.stderr

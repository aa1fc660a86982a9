"""The output directory (issue 12.6, 12.8) and a diverging run (12.3): broken output paths are
refused before any compute with one line and status 2; a run whose loss or gradient norm
becomes non-finite stops at that step naming the last good checkpoint, saves nothing, and its
metrics.jsonl stays valid JSON."""

import json
import os
import shutil

import pytest

from helpers import mpiexec, run, train_cmd

C = ("--sample-tokens", "0", "--val-data=", "--steps", "2")


def refused(r, message):
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], r.stderr
    assert "step " not in r.stdout  # no compute


def snapshot(d):
    return {str(p): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(d.rglob("*"))}


@pytest.mark.parametrize("make,message", [
    (lambda o: (o / "checkpoints").write_text("x"), "checkpoints exists and is not a dir"),
    (lambda o: os.symlink("checkpoints", o / "checkpoints"), "is not a directory"),
    (lambda o: os.symlink(o / "nowhere", o / "checkpoints"), "is not a directory"),
    (lambda o: (o / "metrics.jsonl").mkdir(), "metrics.jsonl exists and is not a regular"),
    (lambda o: (o / "config.json").mkdir(), "config.json exists and is not a regular"),
    (lambda o: os.mkfifo(o / "metrics.jsonl"), "metrics.jsonl exists and is not a regular"),
    (lambda o: os.symlink("config.json", o / "config.json"), "config.json exists and is not"),
])
def test_broken_output_paths_are_refused_before_compute(tmp_path, shards, make, message):
    out = tmp_path / "o"
    out.mkdir()
    make(out)
    before = snapshot(out)
    refused(run(train_cmd(shards, out, *C)), message)
    assert snapshot(out) == before


@pytest.mark.parametrize("out_dir,message", [
    ("", "--out-dir is empty"), ("   ", "--out-dir is empty"),
    ("/proc/mpigpt2-out", "not a writable directory"),
])
def test_bad_out_dir_values(shards, out_dir, message):
    refused(run(train_cmd(shards, "x", *C)[:-len(C)] + list(C) + ["--out-dir", out_dir]),
            message)


def test_out_dir_that_is_a_file(tmp_path, shards):
    (tmp_path / "f").write_text("keep me")
    refused(run(train_cmd(shards, tmp_path / "f", *C)), "not a writable directory")
    assert (tmp_path / "f").read_text() == "keep me"


def test_resume_with_damaged_metrics_keeps_the_original(tmp_path, shards):
    """A non-UTF-8 byte or a foreign line in metrics.jsonl: the resumed run keeps the rows it
    can read and keeps the file as it was in OUT/damaged-1."""
    out = tmp_path / "o"
    r = run(train_cmd(shards, out, *C, "--checkpoint-every", "1"))
    assert r.returncode == 0, r.stderr
    path = out / "metrics.jsonl"
    damaged = b"\xff\xfe not utf-8\n[1, 2]\n" + path.read_bytes()
    path.write_bytes(damaged)
    r = run(train_cmd(shards, out, *C[:-1], "4", "--resume",
                      str(out / "checkpoints/step_00000001")))
    assert r.returncode == 0, r.stderr
    assert "had lines that do not parse" in r.stdout
    assert (out / "damaged-1/metrics.jsonl").read_bytes() == damaged
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [0, 1, 2, 3]


def diverging(shards, out, *extra):
    return train_cmd(shards, out, "--sample-tokens", "0", "--val-data=", "--steps", "6",
                     "--checkpoint-every", "1", "--lr", "1e20", *extra)


def check_diverged(r, out):
    assert r.returncode == 5, r.stdout + r.stderr
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and "non-finite values at step 2/6" in err[0], r.stderr
    assert "last good checkpoint is " + str(out / "checkpoints/step_00000001") in err[0]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000001"]  # no NaN model saved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1] and rows[1]["loss"] is None  # NaN → null


def test_diverging_run_stops_naming_the_last_good_checkpoint(tmp_path, shards):
    """--lr 1e20: step 1 is finite, its update makes the weights ~1e20, step 2 overflows."""
    out = tmp_path / "o"
    check_diverged(run(diverging(shards, out)), out)
    shutil.rmtree(out)


@pytest.mark.timeout(200)
def test_diverging_run_stops_every_rank(tmp_path, shards):
    out = tmp_path / "o"
    check_diverged(run(mpiexec(4) + diverging(shards, out, "--pp", "2", "--dp", "2")), out)


# -- the memory estimate before any allocation (issue 12.5) ----------------------------------
def with_memory(limit):
    return {"MPIGPT2_NODE_MEMORY": str(int(limit))}


@pytest.mark.parametrize("extra,limit", [
    (["--model", "gpt2-1558m", "--seq-len", "64"], 24 << 30),  # state alone is 23 GiB
    (["--batch-size", "4096", "--seq-len", "64"], 24 << 30),  # logits of 4096·64 tokens
])
def test_too_big_is_refused_before_allocating(tmp_path, shards, extra, limit):
    out = tmp_path / "o"
    r = run(train_cmd(shards, out, *C, *extra), env=with_memory(limit), timeout=60)
    refused(r, "not enough memory")
    assert "GiB are available" in r.stderr and not out.exists()


def test_the_suggested_layout_runs(tmp_path, shards):
    """Refused under a small budget with a suggestion; the suggestion passes the same check
    and trains."""
    env = with_memory(550 << 20)
    flags = ("--batch-size", "16", "--seq-len", "64")
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "a", *C, *flags), env=env)
    refused(r, "not enough memory")
    hint = r.stderr.split("try ", 1)[1].split(" (~")[0].split()
    assert hint and hint[0].startswith("--"), r.stderr
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "b", *C, *flags, *hint), env=env)
    assert r.returncode == 0, (hint, r.stderr)


def test_node_shared_dp_is_suggested_when_it_was_turned_off(tmp_path, shards):
    """2 ranks of gpt2-tiny at B16 T64 need ~782 MiB with a private copy each and ~699 MiB
    sharing one: under 740 MiB, --shared-dp off is refused with --shared-dp auto suggested,
    and that passes the same check and trains."""
    env = with_memory(740 << 20)
    flags = ("--batch-size", "16", "--seq-len", "64", "--shared-dp", "off")
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "a", *C, *flags), env=env)
    refused(r, "not enough memory")
    assert "try --shared-dp auto (~" in r.stderr, r.stderr
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "b", *C, *flags, "--shared-dp", "auto"),
            env=env)
    assert r.returncode == 0, r.stderr
    assert "gradient reduction: node-shared" in r.stdout


def test_a_dev_shm_too_small_for_one_copy_is_checked_with_private_copies(tmp_path, shards):
    """The run falls back to a private copy per rank when /dev/shm cannot hold the node's
    windows (MPIGPT2_SHM_BYTES stands in for a container's 64 MiB), so the memory check
    counts private copies too: 740 MiB (enough for one shared copy) is refused, 900 trains
    with the start-up line saying why node-shared dp is off."""
    flags = ("--batch-size", "16", "--seq-len", "64")
    small = {"MPIGPT2_SHM_BYTES": str(64 << 20)}
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "a", *C, *flags),
            env={**with_memory(740 << 20), **small})
    refused(r, "not enough memory")
    assert "needs ~782 MiB" in r.stderr and "--shared-dp auto" not in r.stderr, r.stderr
    r = run(mpiexec(2) + train_cmd(shards, tmp_path / "b", *C, *flags),
            env={**with_memory(900 << 20), **small})
    assert r.returncode == 0, r.stderr
    assert "node-shared off: /dev/shm has no room for one copy per node" in r.stdout, r.stdout


def test_no_memory_check_starts_anyway(tmp_path, shards):
    r = run(train_cmd(shards, tmp_path / "o", *C, "--no-memory-check"), env=with_memory(1))
    assert r.returncode == 0, r.stderr

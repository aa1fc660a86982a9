"""prepare text|jsonl|parquet against an independent reference (tests/prepare_reference.py):
every format and compression, any worker count, mpiexec, resume after kill -9 (also of one
rank under mpiexec)."""

import json
import os
import random
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import PY, descendants, mpiexec, rank_pid, run, stale_shm, start
from mpigpt2.prepare_run import prepare_corpus
from prepare_reference import (documents, expected_shards, shards_in, write_jsonl,
                               write_parquet, write_text)

SHARD, VAL = 257, 100  # small: many documents straddle shard boundaries


def prepare(kind, paths, out, **kw):
    kw = {"shard_tokens": SHARD, "val_tokens": VAL, "chunk_bytes": 300, "quiet": True,
          "workers": 1, **kw}
    return prepare_corpus(kind, [str(p) for p in paths], str(out), **kw)


@pytest.mark.parametrize("how", ["", "gz", "zst", "xz"])
def test_jsonl_matches_reference(tmp_path, how):
    docs = documents(120, seed=1)
    paths = write_jsonl(tmp_path, docs, 3, how)
    counts = prepare("jsonl", paths, tmp_path / "out")
    want = expected_shards(docs, SHARD, VAL)
    assert shards_in(tmp_path / "out") == want
    assert counts == [(len(b) - 1024) // 2 for b in want.values()]


@pytest.mark.parametrize("how", ["", "gz"])
def test_text_matches_reference(tmp_path, how):
    docs = documents(30, seed=2)
    paths = write_text(tmp_path, docs, how)
    prepare("text", paths, tmp_path / "out", chunk_bytes=37)  # tiny chunks: many safe cuts
    assert shards_in(tmp_path / "out") == expected_shards(docs, SHARD, VAL, prefix="text")


def test_parquet_matches_reference(tmp_path):
    docs = documents(90, seed=3)
    paths = write_parquet(tmp_path, docs, 2, row_group_size=7)
    prepare("parquet", paths, tmp_path / "out", workers=2)
    assert shards_in(tmp_path / "out") == expected_shards(docs, SHARD, VAL, prefix="parquet")


def test_val_shards_directory_and_glob_inputs(tmp_path):
    """--val-shards 1 makes shard 0 a whole val shard (llm.c); a directory or a glob gives the
    files in name order."""
    docs = documents(80, seed=4)
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in", docs, 4, "gz")
    want = expected_shards(docs, SHARD, val_shards=1)
    assert "jsonl_val_000000.bin" in want and "jsonl_train_000001.bin" in want
    prepare_corpus("jsonl", [str(tmp_path / "in")], str(tmp_path / "a"), shard_tokens=SHARD,
                   val_tokens=0, val_shards=1, workers=1, quiet=True)
    assert shards_in(tmp_path / "a") == want
    prepare_corpus("jsonl", [str(tmp_path / "in" / "part*.jsonl.gz")], str(tmp_path / "b"),
                   shard_tokens=SHARD, val_tokens=0, val_shards=1, workers=1, quiet=True)
    assert shards_in(tmp_path / "b") == want


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.text(max_size=40), min_size=1, max_size=12).filter(
    lambda d: "".join(d).strip()), shard=st.integers(1, 40), chunk=st.integers(1, 64))
def test_any_documents_any_sizes(tmp_path_factory, docs, shard, chunk):
    d = tmp_path_factory.mktemp("h")
    paths = write_jsonl(d, docs, min(2, len(docs)), "zst")
    prepare("jsonl", paths, d / "out", shard_tokens=shard, val_tokens=0, chunk_bytes=chunk)
    assert shards_in(d / "out") == expected_shards(docs, shard)


def corpus(d, n, seed, nfiles, how, shard):
    """Compressed JSON Lines files of n generated documents, and their expected shards."""
    docs = documents(n, seed=seed, empty_every=11)
    return write_jsonl(d, docs, nfiles, how), expected_shards(docs, shard, 1000)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """For the worker-count tests: 4 gzip files, ~37 shards."""
    return corpus(tmp_path_factory.mktemp("big"), 3000, 5, 4, "gz", 5000)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    """Long enough (~2.5M tokens, ~120 shards) for a kill to land in the middle of the run."""
    return corpus(tmp_path_factory.mktemp("bigger"), 40000, 6, 3, "zst", 20000)


def cli(paths, out, *extra, shard=5000):
    return [PY, "-m", "mpigpt2.prepare", "jsonl", *map(str, paths), "--out-dir", str(out),
            "--shard-tokens", str(shard), "--val-tokens", "1000", "--quiet", *extra]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_give_the_same_bytes(tmp_path, big, workers):
    paths, want = big
    r = run(cli(paths, tmp_path / "o", "--workers", str(workers)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert shards_in(tmp_path / "o") == want


def test_mpiexec_2_gives_the_same_bytes(tmp_path, big):
    paths, want = big
    r = run(mpiexec(2) + cli(paths, tmp_path / "o"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert shards_in(tmp_path / "o") == want
    assert "wrote" in r.stdout and r.stdout.count("wrote") == 1  # rank 0 reports, once


def wait_for_shards(out, n, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"no {n} shards in {out} after {timeout}s")


@pytest.mark.parametrize("seed", [0, 1])
def test_resume_after_kill_9(tmp_path, bigger, seed):
    """kill -9 at a random point: nothing partial under a final name, the workers exit by
    themselves, and the rerun finishes with the uninterrupted run's bytes."""
    paths, want = bigger
    rnd = random.Random(seed)
    out = tmp_path / "o"
    p = start(cli(paths, out, "--workers", "2", shard=20000))
    wait_for_shards(out, rnd.randint(1, len(want) // 2))
    time.sleep(rnd.uniform(0, 0.02))
    kids = descendants(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    t0 = time.monotonic()
    while any(os.path.exists(f"/proc/{k}") and _alive(k) for k in kids):
        assert time.monotonic() - t0 < 20, "workers outlived the killed writer"
        time.sleep(0.05)
    have = shards_in(out)
    assert 0 < len(have) < len(want)
    assert all(want[name] == data for name, data in have.items())  # complete, or absent
    r = run(cli(paths, out, "--workers", "2", shard=20000), timeout=120)
    assert r.returncode == 0, r.stderr
    assert shards_in(out) == want
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    r = run(cli(paths, out, shard=20000), timeout=120)  # finished: verified, not rewritten
    assert r.returncode == 0 and "already complete" in r.stdout


def test_mpiexec_kill_9_of_one_rank(tmp_path, bigger):
    """kill -9 of one rank of `mpiexec -n 2 prepare`: its sentinel names it (MPICH's banner
    gives only a pid), the job ends, nothing the job put in /dev/shm outlives it, the shards
    written are whole, and the rerun under mpiexec finishes with the uninterrupted run's bytes."""
    paths, want = bigger
    out = tmp_path / "o"
    shm_before = os.listdir("/dev/shm")
    p = start(mpiexec(2) + cli(paths, out, shard=20000))
    wait_for_shards(out, 2)
    pid = rank_pid(p, 1, "mpigpt2.prepare")
    assert pid, p.poll()
    os.kill(pid, signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    lost = [x for x in err.splitlines() if "died without a word" in x]
    assert len(lost) == 1 and lost[0].startswith(f"[rank 1] died without a word (pid {pid} "), err
    assert "Traceback" not in err, err  # (rank 0 may see MPI fail its receive first: one line)
    assert not stale_shm(shm_before)
    have = shards_in(out)
    assert 0 < len(have) < len(want) and all(want[name] == data for name, data in have.items())
    r = run(mpiexec(2) + cli(paths, out, shard=20000), timeout=120)
    assert r.returncode == 0, r.stderr
    assert shards_in(out) == want


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_leaves_no_temp_and_resumes(tmp_path, big):
    paths, want = big
    out = tmp_path / "o"
    p = start(cli(paths, out, "--workers", "2"))
    wait_for_shards(out, 2)
    os.kill(p.pid, signal.SIGTERM)
    p.communicate(timeout=30)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    prepare_corpus("jsonl", [str(x) for x in paths], str(out), shard_tokens=5000,
                   val_tokens=1000, workers=1, quiet=True)
    assert shards_in(out) == want


def test_damaged_shard_is_rewritten_on_resume(tmp_path, big):
    """A rerun verifies each shard's sha256 against the manifest and redoes from the first bad
    one (here the run was complete, so the check alone finds the damage)."""
    paths, want = big
    out = tmp_path / "o"
    kw = dict(shard_tokens=5000, val_tokens=1000, workers=1, quiet=True)
    prepare_corpus("jsonl", [str(x) for x in paths], str(out), **kw)
    victim = out / sorted(want)[len(want) // 2]
    data = bytearray(victim.read_bytes())
    data[2000] ^= 1
    victim.write_bytes(bytes(data))
    prepare_corpus("jsonl", [str(x) for x in paths], str(out), **kw)
    assert shards_in(out) == want

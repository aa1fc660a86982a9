"""Nothing lost: bit-exact resume, resume under another layout, preemption, killed ranks,
crashes and a full disk during a checkpoint write."""

import json
import os
import resource
import shutil
import signal
import subprocess
import time

import pytest

from helpers import run, mpiexec, train_cmd, start, finish, descendants, cmdline, two_cores
from tolerances import PARITY_F32

STEPS = 12


def cmd(shards, out, n, *extra):
    base = train_cmd(shards, out, "--steps", str(STEPS), "--sample-tokens", "0",
                     "--val-steps", "1", "--checkpoint-every", "3", "--lr", "1e-3", *extra)
    return mpiexec(n) + base if n else base


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def ckpts(out):
    d = out / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def wait_for_step(out, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / "metrics.jsonl").exists() and any(s >= step for s, _ in losses(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("run did not reach step")


@pytest.fixture(scope="module")
def reference(module_tmp, shards):
    """Uninterrupted runs, one per layout used below."""
    refs = {}
    for n, extra in ((1, ()), (4, ("--pp", "2", "--dp", "2", "--microbatches", "2",
                                   "--slice-tokens", "8"))):
        out = module_tmp(f"ref{n}")
        r = run(cmd(shards, out, n, *extra))
        assert r.returncode == 0, r.stderr
        assert n == 1 or "gradient reduction: node-shared" in r.stdout  # (the default)
        refs[n] = (out, extra)
    return refs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_checkpoint_and_bit_exact_resume(tmp_path, shards, reference, n, sig):
    ref_out, extra = reference[n]
    out = tmp_path / "run"
    p = start(cmd(shards, out, n, *extra))
    wait_for_step(out, 4, p)
    os.killpg(p.pid, sig)  # the launcher and every rank get it, as from a scheduler
    code, _, err = finish(p)
    assert code == 3, err  # checkpointed, "requeue me"
    assert ckpts(out), "no checkpoint written on the signal"
    r = run(cmd(shards, out, n, *extra, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert losses(out) == losses(ref_out)  # bit for bit
    last = f"step_{STEPS:08d}"
    assert (out / "checkpoints" / last / "model.bin").read_bytes() == \
        (ref_out / "checkpoints" / last / "model.bin").read_bytes()


@pytest.mark.timeout(300)
def test_resume_under_another_layout(tmp_path, shards, reference):
    ref_out, _ = reference[1]
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000006")
    r = run(cmd(shards, out, 4, "--pp", "2", "--dp", "2", "--microbatches", "2",
                "--slice-tokens", "4", "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    got, want = dict(losses(out)), dict(losses(ref_out))
    assert sorted(got) == list(range(6, STEPS))
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < PARITY_F32


@pytest.mark.timeout(300)
def test_idle_ranks_end_with_the_busy_ranks_status(tmp_path, shards, reference):
    """8 ranks on this 2-core machine: 2 compute, 6 wait (--busy-ranks auto). A scheduler's
    signal to every process: the busy ranks checkpoint and exit 3, and so does the whole job
    (the idle ranks take the busy ranks' status); the resumed job (8 ranks again) continues
    to one process's losses."""
    two = two_cores()
    out = tmp_path / "run"
    p = start(two + cmd(shards, out, 8))  # (two cores, whatever the machine has)
    wait_for_step(out, 4, p)
    os.killpg(p.pid, signal.SIGTERM)
    code, stdout, err = finish(p)
    assert code == 3, err
    assert "busy ranks: 2 of 8" in stdout, stdout
    assert ckpts(out), "no checkpoint written on the signal"
    r = run(two + cmd(shards, out, 8, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    got, want = dict(losses(out)), dict(losses(reference[1][0]))
    assert sorted(got) == list(range(STEPS))
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < PARITY_F32


@pytest.mark.timeout(300)
def test_resume_node_shared_checkpoint_without_it(tmp_path, shards, reference):
    """The 4-rank reference ran dp 2 node-shared (one copy of parameters and Adam state per
    node); its checkpoint resumes under MPI's allreduce with per-rank copies."""
    ref_out, extra = reference[4]
    out = tmp_path / "run"
    shutil.copytree(ref_out / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000006")
    r = run(cmd(shards, out, 4, *extra, "--shared-dp", "off", "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert "node-shared off: --shared-dp off" in r.stdout
    got, want = dict(losses(out)), dict(losses(ref_out))
    assert sorted(got) == list(range(6, STEPS))
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < PARITY_F32


@pytest.mark.timeout(180)
def test_kill_9_of_a_rank_ends_the_job_and_resume_continues(tmp_path, shards, reference):
    out = tmp_path / "run"
    extra = reference[4][1]
    p = start(cmd(shards, out, 4, *extra))
    wait_for_step(out, 4, p)
    ranks = [q for q in descendants(p.pid) if b"mpigpt2.train" in cmdline(q)
             and b"mpiexec" not in cmdline(q)]
    assert len(ranks) == 4, ranks
    victim = ranks[-1]
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish(p, timeout=60)
    assert code != 0 and time.time() - t0 < 15, err
    r = run(cmd(shards, out, 4, *extra, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(reference[4][0])


@pytest.mark.timeout(180)
def test_crash_during_checkpoint_write_keeps_previous(tmp_path, shards, reference):
    out = tmp_path / "run"
    p = start(cmd(shards, out, 0), env={"MPIGPT2_TEST_CRASH_IN_CHECKPOINT": "6"})
    code, _, err = finish(p)
    assert code == 9
    assert ckpts(out)[-1] == "step_00000003"  # the half-written step 6 does not count
    assert any(x.startswith(".tmp-") for x in os.listdir(out / "checkpoints"))
    r = run(cmd(shards, out, 0, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    assert "step_00000003" in r.stdout
    assert losses(out) == losses(reference[1][0])
    assert not any(x.startswith(".tmp-") for x in os.listdir(out / "checkpoints"))


@pytest.mark.timeout(180)
def test_disk_full_during_checkpoint(tmp_path, shards):
    """A file-size limit makes the model write fail like a full disk: one line, exit 2, the
    earlier checkpoint untouched, no partial files."""
    out = tmp_path / "run"
    ok = run(cmd(shards, out, 0, "--steps", "3"))
    assert ok.returncode == 0 and ckpts(out) == ["step_00000003"], ok.stderr
    before = {p.name: p.read_bytes() for p in (out / "checkpoints/step_00000003").iterdir()}

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # below the 29 MB model file, above what MPI start-up writes to shared memory
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    e = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd(shards, out, 0, "--resume", "auto", "--steps", "6"), env=e,
                       capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "could not be written" in err[0] and "Traceback" not in r.stderr
    assert ckpts(out) == ["step_00000003"]
    assert not any(x.startswith(".tmp-") for x in os.listdir(out / "checkpoints"))
    assert {p.name: p.read_bytes() for p in (out / "checkpoints/step_00000003").iterdir()} \
        == before

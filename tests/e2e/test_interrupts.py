"""Interruptions the scheduler or a user may cause, at chosen steps and ranks: a signal to
mpiexec alone or to one rank alone, Ctrl-C on the launcher, kill -9 of rank 0 or of mpiexec,
a rank failing alone after set-up. Every resumed run must equal its uninterrupted twin bit for
bit — training losses, validation losses and final weights — and nothing may hang."""

import json
import os
import signal
import sys
import time

import pytest

from helpers import run, mpiexec
from helpers import start, finish, descendants, cmdline, stale_shm
from helpers import train_cmd

STEPS = 10
LAYOUT = ["--pp", "2", "--dp", "2", "--microbatches", "2", "--slice-tokens", "8"]


def cmd(shards, out, n, *extra):
    base = train_cmd(shards, out, "--steps", str(STEPS), "--sample-tokens", "4", "--val-steps",
                     "1", "--val-every", "2", "--checkpoint-every", "2", "--lr", "1e-3",
                     "--batch-size", "8", "--save", str(out / "final.bin"), *extra)
    return mpiexec(n) + base if n > 1 else base


def rows(out):
    """(step, kind, value) of every metrics row but the summary, in file order."""
    out_rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for kind in ("loss", "val_loss"):
            if kind in r:
                out_rows.append((r["step"], kind, r[kind]))
    return out_rows


def train_steps(out):
    return [s for s, kind, _ in rows(out) if kind == "loss"] if (out / "metrics.jsonl").exists() \
        else []


def wait_for(out, step, proc, timeout=150):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= step for s in train_steps(out)):
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("run did not reach the step")


def rank_pids(proc):
    """World rank -> pid of the training processes under this mpiexec."""
    out = {}
    for pid in descendants(proc.pid):
        if b"mpigpt2.train" not in cmdline(pid) or b"mpiexec" in cmdline(pid):
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for e in env:
            if e.startswith(b"PMI_RANK=") or e.startswith(b"OMPI_COMM_WORLD_RANK="):
                out[int(e.split(b"=")[1])] = pid
    return out


@pytest.fixture(scope="module")
def twin(module_tmp, shards):
    out = module_tmp("twin")
    r = run(cmd(shards, out, 4, *LAYOUT), timeout=240)
    assert r.returncode == 0, r.stderr
    return out


def resume_and_compare(shards, out, twin, n=4):
    r = run(cmd(shards, out, n, *LAYOUT, "--resume", "auto"), timeout=240)
    assert r.returncode == 0, r.stderr
    assert rows(out) == rows(twin)  # losses and validation losses, bit for bit, same order
    assert (out / "final.bin").read_bytes() == (twin / "final.bin").read_bytes()
    return r


# (what is hit, signal, step to wait for, world rank for a one-rank signal)
CASES = [
    ("mpiexec", signal.SIGTERM, 3, None),
    ("mpiexec", signal.SIGINT, 5, None),
    ("rank", signal.SIGUSR1, 2, 3),
    ("rank", signal.SIGTERM, 6, 1),
    ("rank", signal.SIGKILL, 4, 0),      # rank 0 (the one that writes) dies: no checkpoint
    ("mpiexec", signal.SIGKILL, 7, None),
]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("target,sig,step,rank", CASES,
                         ids=[f"{c[1].name}-{c[0]}{'' if c[3] is None else c[3]}@{c[2]}"
                              for c in CASES])
def test_interrupt_then_resume_is_bit_exact(tmp_path, shards, twin, target, sig, step, rank):
    out = tmp_path / "run"
    p = start(cmd(shards, out, 4, *LAYOUT))
    wait_for(out, step, p)
    pids = rank_pids(p)
    assert sorted(pids) == [0, 1, 2, 3], pids
    t0 = time.time()
    os.kill(p.pid if target == "mpiexec" else pids[rank], sig)
    code, _, err = finish(p, timeout=60)
    assert time.time() - t0 < 30, err
    if sig == signal.SIGKILL:
        assert code != 0
        time.sleep(1.0)
        left = [q for q in pids.values() if os.path.exists(f"/proc/{q}") and
                b"mpigpt2.train" in cmdline(q)]
        for q in left:  # (if mpiexec died hard, its ranks must not run on unseen)
            os.kill(q, signal.SIGKILL)
        assert not left, f"ranks outlived the job: {left}"
    else:
        assert code == 3, err  # agreed at the next step end, checkpointed, "requeue me"
    resume_and_compare(shards, out, twin)


@pytest.mark.timeout(180)
def test_a_second_signal_ends_the_job_at_once_leaving_nothing(tmp_path, shards):
    """Two signals at once to one rank: it exits without a checkpoint and without
    MPI_Finalize (parallel/signals.py); the job ends, no rank is reported lost, and nothing
    is left in /dev/shm (the rank's sentinel removes MPI's segment, base/watchdog.py)."""
    out = tmp_path / "run"
    shm_before = os.listdir("/dev/shm")
    p = start(cmd(shards, out, 4, *LAYOUT))
    wait_for(out, 2, p)
    victim = rank_pids(p)[1]
    os.kill(victim, signal.SIGTERM)
    os.kill(victim, signal.SIGINT)
    code, _, err = finish(p, timeout=60)
    assert code not in (0, 3), err
    assert "[rank 1] second signal SIG" in err, err
    assert "died without a word" not in err, err
    assert not stale_shm(shm_before)


@pytest.mark.timeout(300)
def test_ctrl_c_on_the_launcher_checkpoints(tmp_path, shards, twin):
    """`make train` runs the launcher: Ctrl-C (SIGINT to the foreground group) must reach the
    ranks through mpiexec and end in a checkpoint, not kill mpiexec from a Python parent."""
    out = tmp_path / "run"
    base = cmd(shards, out, 1, *LAYOUT)[3:]  # the train flags only
    p = start([sys.executable, "-m", "mpigpt2.launch", "-n", "4", "--"] + base)
    wait_for(out, 3, p)
    os.killpg(p.pid, signal.SIGINT)
    code, _, err = finish(p, timeout=60)
    assert code == 3, err
    assert "Traceback" not in err
    resume_and_compare(shards, out, twin)


@pytest.mark.timeout(120)
def test_an_error_on_one_rank_after_set_up_ends_the_job(tmp_path):
    """A UserError raised on one rank alone (not agreed) must not leave the others waiting,
    nor MPI's shared-memory files in /dev/shm (the ranks run with the trainer's sentinel)."""
    code = ("import sys\n"
            "from mpigpt2.base.watchdog import guard_init, init_done\n"
            "guard_init([])\n"
            "from mpi4py import MPI\n"
            "init_done()\n"
            "from mpigpt2.base.errors import run_cli, UserError\n"
            "def main(argv):\n"
            "    if MPI.COMM_WORLD.Get_rank() == 1:\n"
            "        raise UserError('disk full on rank 1')\n"
            "    MPI.COMM_WORLD.Barrier()\n"
            "    return 0\n"
            "sys.exit(run_cli(main, []))\n")
    t0 = time.time()
    shm_before = os.listdir("/dev/shm")
    r = run(mpiexec(2) + [sys.executable, "-c", code], timeout=60)
    assert r.returncode != 0 and time.time() - t0 < 30
    assert "error (rank 1): disk full on rank 1" in r.stderr, r.stderr
    assert "died without a word" not in r.stderr, r.stderr  # (an exit on purpose)
    assert not stale_shm(shm_before)

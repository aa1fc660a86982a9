"""A stopped peer never hangs the job (issue 12.2): rank 1 gets SIGSTOP at some moment from
before MPI_Init to mid-training, and the job ends within --wait-timeout plus a margin, with a
line naming a waiting rank and what it waited for, and no process or /dev/shm file left behind
(MPICH's own segment, which only MPI_Finalize removes, included). Where the stop
lands depends on timing; every place must be bounded, so every delay must pass."""

import os
import signal
import time

import pytest

from helpers import PY, cmdline, mpiexec, rank_pid, stale_shm, start

TIMEOUT = 5  # --wait-timeout
MARGIN = 20  # the launcher's clean-up, the abort grace


def train_args(shards, out):
    train, _ = shards
    return ["-m", "mpigpt2.train", "--train-data", str(train), "--val-data=", "--out-dir",
            str(out), "--batch-size", "4", "--seq-len", "32", "--steps", "40", "--pp", "2",
            "--sample-tokens", "0", "--wait-timeout", str(TIMEOUT)]


def ends_bounded(proc, out, shm_before, victim=None):
    t0 = time.time()
    try:
        _, err = proc.communicate(timeout=TIMEOUT + MARGIN)
    except Exception:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no end within {TIMEOUT + MARGIN}s of the stop")
    finally:
        if victim:
            try:
                os.kill(victim, signal.SIGKILL)  # (the launcher should have done so)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    assert "gave up (--wait-timeout)" in err and "[rank " in err and "waiting for" in err, err
    assert "died without a word" not in err, err  # (the ranks the launcher ended: no loss)
    assert time.time() - t0 < TIMEOUT + MARGIN
    time.sleep(0.5)
    left = [p for p in os.listdir("/proc") if p.isdigit() and str(out).encode() in cmdline(p)]
    assert not left, f"processes left behind: {left}"
    assert not stale_shm(shm_before)  # (the sentinels remove it, base/watchdog.py)
    return err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay", [0.1, 0.5, 1.0, 2.0, 4.0])
def test_sigstop_on_one_rank_ends_the_job(tmp_path, shards, delay):
    out = tmp_path / "o"
    shm_before = os.listdir("/dev/shm")
    proc = start(mpiexec(4) + [PY] + train_args(shards, out))
    time.sleep(delay)
    victim = None
    for _ in range(200):
        victim = rank_pid(proc, 1, str(out))
        if victim or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert victim, "rank 1 not found"
    os.kill(victim, signal.SIGSTOP)
    ends_bounded(proc, out, shm_before, victim)


@pytest.mark.timeout(120)
def test_rank_stopped_before_mpi_init(tmp_path, shards):
    """Rank 1 stops itself before Python starts: the others wait in MPI_Init, which holds the
    GIL; the forked watchdog (base/watchdog.py) still ends them."""
    out = tmp_path / "o"
    script = ('[ "$PMI_RANK" = 1 ] && kill -STOP $$; exec "$0" "$@"')
    shm_before = os.listdir("/dev/shm")
    proc = start(mpiexec(4) + ["sh", "-c", script, PY] + train_args(shards, out))
    err = ends_bounded(proc, out, shm_before)
    assert "waiting for MPI_Init" in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", [0, 2])
def test_kill_9_names_the_lost_rank(tmp_path, shards, victim):
    """MPICH kills the other ranks at once and names only a PID; the lost rank's sentinel
    (base/watchdog.py) names the rank, once, and no other rank is reported."""
    out = tmp_path / "o"
    shm_before = os.listdir("/dev/shm")
    proc = start(mpiexec(4) + [PY] + train_args(shards, out))
    pid = None
    for _ in range(1000):
        pid = rank_pid(proc, victim, str(out))
        if pid and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    out_text, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lost = [x for x in err.splitlines() if "died without a word" in x]
    assert len(lost) == 1 and lost[0].startswith(f"[rank {victim}] died without a word (pid "
                                                 f"{pid} "), err
    # dp 2 on one node: the parameters were in node-shared memory; nothing the job put in
    # /dev/shm outlives it (MPICH's own segments included: the sentinels remove them)
    assert "gradient reduction: node-shared" in out_text
    assert not stale_shm(shm_before)


def test_a_clean_run_reports_no_loss(tmp_path, shards):
    proc = start(mpiexec(2) + [PY] + train_args(shards, tmp_path / "o") + ["--steps", "2"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "died without a word" not in err and "gave up" not in err

"""The training command under mpiexec: default layout, parity with one process, failures."""

import json
import time

import pytest

from helpers import run, mpiexec
from helpers import train_cmd, two_cores
from tolerances import PARITY_F32


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


COMMON = ["--steps", "3", "--sample-tokens", "0", "--val-steps", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def one_process(module_tmp, shards):
    out = module_tmp("one")
    r = run(train_cmd(shards, out, *COMMON))
    assert r.returncode == 0, r.stderr
    return losses(out)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra,shown", [
    ([], "busy ranks: 2 of 8"),  # the default: one busy rank per core (2 cores here)
    (["--busy-ranks", "all"], "pp 1 × dp 8"),  # node-shared dp 8
    (["--busy-ranks", "all", "--shared-dp", "off"], "pp 1 × dp 8"),  # MPI's allreduce
    (["--pp", "4"], "pp 4 × dp 2"),
    (["--pp", "2", "--microbatches", "2", "--slice-tokens", "8", "--schedule", "gpipe"],
     "pp 2 × dp 4"),
    (["--pp", "4", "--microbatches", "1", "--slice-tokens", "8", "--schedule", "1f1b"],
     "pp 4 × dp 2 | stages [1, 1, 1, 1] | M=1 k=8 1f1b"),  # 1F1B with M < pp
])
def test_8_ranks_match_one_process(tmp_path, shards, one_process, extra, shown):
    pin = two_cores() if not extra else []  # (the default's busy ranks: one per core)
    eight = run(pin + mpiexec(8) + train_cmd(shards, tmp_path / "eight", *COMMON, *extra))
    assert eight.returncode == 0, eight.stderr
    assert shown in eight.stdout
    a, b = one_process, losses(tmp_path / "eight")
    assert len(a) == len(b) == 3
    assert max(abs(x - y) / x for x, y in zip(a, b)) < PARITY_F32
    # only rank 0 prints and writes
    assert eight.stdout.count("step     1/3") == 1


@pytest.mark.timeout(120)
def test_exception_on_one_rank_ends_the_job(tmp_path, shards):
    t0 = time.time()
    r = run(mpiexec(4) + train_cmd(shards, tmp_path / "o", "--steps", "50", "--pp", "2",
                                   "--inject-error", "3:1", "--sample-tokens", "0"),
            timeout=90)
    assert r.returncode != 0
    assert "[rank 3]" in r.stderr and "injected failure on rank 3 at step 1" in r.stderr
    assert time.time() - t0 < 60


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n,extra,message", [
    # every rank finds the error itself and all agree: one line, status 2, no output dir. The
    # messages of every layout error are checked without MPI (unit/test_schedule.py).
    (4, ["--pp", "3"], "--pp 3 does not divide the 4 MPI ranks"),       # from the world size
    (4, ["--pp", "2", "--dp", "3"], "mpiexec started 4 ranks"),         # flags vs world
    (2, ["--model", "nope"], "unknown model preset"),                  # the model source
    (2, ["--pp", "2", "--train-data", "/nonexistent/shard_*.bin"], "--train-data"),  # files
    (2, ["--pp", "2", "--schedule", "zigzag"], "--schedule 'zigzag': choose one of"),
])
def test_bad_layout_under_mpi(tmp_path, shards, n, extra, message):
    out = tmp_path / "out"
    r = run(mpiexec(n) + train_cmd(shards, out, "--steps", "2", *extra), timeout=90)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("error") and message in err[0], r.stderr
    assert not out.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra,message", [
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--pp", "two"], "invalid int value: 'two'"),
])
def test_usage_error_printed_once_under_mpi(tmp_path, shards, extra, message):
    """Every rank parses the flags; only rank 0 prints the usage error."""
    r = run(mpiexec(4) + train_cmd(shards, tmp_path / "o", *extra), timeout=90)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("usage: python -m mpigpt2.train") == 1, r.stderr
    assert r.stderr.count(message) == 1, r.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,ranks", [("ScheduleInterleavedZeroBubble", 2),
                                        ("ScheduleInterleaved1F1B", 4)])
def test_schedule_file_written_by_torch_trains_like_one_process(tmp_path, shards, one_process,
                                                                name, ranks):
    """A schedule file from torch.distributed.pipelining's own builder (the ZB one splits
    every backward into I and W), run with token slices: the losses of one process."""
    from helpers_torch_schedules import torch_schedule_csv
    path = torch_schedule_csv(tmp_path / "s.csv", name, 2, 2)
    r = run(mpiexec(ranks) + train_cmd(shards, tmp_path / "o", *COMMON, "--pp", "2",
                                       "--microbatches", "2", "--slice-tokens", "8",
                                       "--schedule", str(path)))
    assert r.returncode == 0, r.stderr
    a, b = one_process, losses(tmp_path / "o")
    assert len(b) == 3 and max(abs(x - y) / x for x, y in zip(a, b)) < PARITY_F32

"""ZeRO-1 from the command line: resume across zero modes, optimizer memory per rank, and the
pure shard arithmetic."""

import json
import shutil

import numpy as np
import pytest

from conftest import run, mpiexec
from test_cli import train_cmd
from tolerances import PARITY_F32
from mpigpt2.zero import shard_bounds, segment_split


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def cmd(shards, out, n, *extra):
    return mpiexec(n) + train_cmd(shards, out, "--steps", "8", "--sample-tokens", "0",
                                  "--val-steps", "1", "--checkpoint-every", "4", "--lr", "1e-3",
                                  *extra)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("first,then", [("0", "1"), ("1", "0")])
def test_resume_across_zero_modes(tmp_path, shards, first, then):
    a = tmp_path / "a"
    r = run(cmd(shards, a, 2, "--dp", "2", "--zero", first))
    assert r.returncode == 0, r.stderr
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step_00000004", b / "checkpoints" / "step_00000004")
    r = run(cmd(shards, b, 4, "--dp", "4", "--zero", then, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    want, got = losses(a), losses(b)
    assert sorted(got) == [4, 5, 6, 7]
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < PARITY_F32


@pytest.mark.timeout(300)
def test_optimizer_memory_per_rank_is_one_over_dp(tmp_path, shards):
    per_rank = {}
    for zero in ("0", "1"):
        out = tmp_path / f"z{zero}"
        r = run(cmd(shards, out, 4, "--dp", "4", "--zero", zero, "--steps", "2",
                    "--checkpoint-every", "0", "--no-final-checkpoint"))
        assert r.returncode == 0, r.stderr
        ranks = metrics(out)[-1]["ranks"]
        per_rank[zero] = [x["optim_bytes"] for x in ranks]
    full = per_rank["0"][0]
    assert all(x == full for x in per_rank["0"])
    assert sum(per_rank["1"]) == full  # the shards partition the state exactly
    assert all(abs(x / full - 0.25) < 1e-3 for x in per_rank["1"])


def test_shards_partition_unevenly():
    for N, dp in ((10, 3), (7, 4), (1000, 8), (5, 5)):
        b = shard_bounds(N, dp)
        assert b[0][0] == 0 and b[-1][1] == N
        assert all(b[i][1] == b[i + 1][0] for i in range(dp - 1))
        assert max(h - l for l, h in b) - min(h - l for l, h in b) <= 1
        for a, z in ((0, N), (1, N - 1), (N // 2, N // 2 + 1)):
            counts, displs = segment_split(a, z, b)
            assert sum(counts) == z - a
            covered = np.zeros(z - a, int)
            for c, d in zip(counts, displs):
                covered[d:d + c] += 1
            assert covered.tolist() == [1] * (z - a)

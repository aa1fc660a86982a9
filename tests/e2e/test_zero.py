"""ZeRO-1 from the command line: resume across zero modes, optimizer memory per rank (the tied
wte sharded over its two stages), and the pure shard arithmetic."""

import json
import shutil

import numpy as np
import pytest

from helpers import run, mpiexec
from helpers import train_cmd
from tolerances import PARITY_F32
from mpigpt2.model.config import GPTConfig
from mpigpt2.parallel.layout import Layout
from mpigpt2.model.params import ParamLayout, num_parameters
from mpigpt2.parallel.zero import shard_bounds, segment_split


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def cmd(shards, out, n, *extra):
    return mpiexec(n) + train_cmd(shards, out, "--steps", "8", "--sample-tokens", "0",
                                  "--val-steps", "1", "--checkpoint-every", "4", "--lr", "1e-3",
                                  *extra)


def flags(pp, dp, zero):
    return ["--pp", str(pp), "--dp", str(dp), "--zero", str(zero)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("first,then", [((1, 2, 0), (1, 4, 1)), ((1, 2, 1), (1, 4, 0)),
                                        ((2, 2, 1), (2, 1, 1))],  # wte's moments over 4, 2
                         ids=["zero0-to-1", "zero1-to-0", "pp2-dp2-to-dp1"])
def test_resume_across_zero_modes(tmp_path, shards, first, then):
    a = tmp_path / "a"
    r = run(cmd(shards, a, first[0] * first[1], *flags(*first)))
    assert r.returncode == 0, r.stderr
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoints" / "step_00000004", b / "checkpoints" / "step_00000004")
    r = run(cmd(shards, b, then[0] * then[1], *flags(*then), "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    want, got = losses(a), losses(b)
    assert sorted(got) == [4, 5, 6, 7]
    assert max(abs(got[s] - want[s]) / want[s] for s in got) < PARITY_F32


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pp,dp", [(1, 4), (2, 2), (2, 1)])
def test_optimizer_memory_per_rank_is_its_share(tmp_path, shards, pp, dp):
    """Each rank keeps Adam state for its stage's parameters ÷ dp, the tied wte (on the first
    and the last stage when pp > 1) counted half on each: the whole world holds it once."""
    out = tmp_path / "out"
    r = run(cmd(shards, out, pp * dp, *flags(pp, dp, 1), "--steps", "2",
                "--checkpoint-every", "0", "--no-final-checkpoint"))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    cfg, lay = GPTConfig(**config["model"]), Layout(**config["layout"])
    state = 2 * np.dtype(config["args"]["dtype"]).itemsize  # Adam m and v per parameter
    W = cfg.padded_vocab_size * cfg.channels
    ranks = metrics(out)[-1]["ranks"]
    assert len(ranks) == pp * dp
    for x in ranks:
        spec = lay.spec(x["stage"])
        tied = W if pp > 1 and (spec.first or spec.last) else 0
        share = (ParamLayout(cfg, spec).size - tied) / dp + tied / (2 * dp)
        assert abs(x["optim_bytes"] / state - share) <= 2, (x, share)  # uneven shards: ±1 each
    assert sum(x["optim_bytes"] for x in ranks) == state * num_parameters(cfg)


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

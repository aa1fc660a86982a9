"""End-to-end command lines: prepare, train, sample; every bad input ends in one line, exit 2."""

import json

import numpy as np
import pytest

from helpers import PY, run, TEXT, train_cmd
from mpigpt2.base import blas
from mpigpt2.model.config import GPTConfig
from mpigpt2.formats.llmc import write_model
from mpigpt2.model.gpt import GPT
from mpigpt2.formats.shards import write_shard



def test_end_to_end(tmp_path, shards):
    out = tmp_path / "out"
    r = run(train_cmd(shards, out, "--steps", "3", "--sample-tokens", "8", "--val-steps", "2",
                      "--save", str(out / "model.bin")))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [0, 1, 2]
    assert all(k in steps[0] for k in ("loss", "lr", "step_ms", "tokens_per_s"))
    assert abs(steps[0]["loss"] - np.log(50257)) < 0.5  # random init: ~uniform predictions
    assert any("val_loss" in x for x in lines)
    config = json.loads((out / "config.json").read_text())
    assert config["layout"]["pp"] == 1
    # the BLAS kernels, named as this process chose them (the trainer inherited the choice)
    assert config["blas"] == {**blas.info(), "why": blas.CHOICE}, config["blas"]
    assert blas.describe(config["blas"]) in r.stdout.splitlines()
    assert "sample at step 3" in r.stdout
    s = run([PY, "-m", "mpigpt2.sample", "--model", str(out / "model.bin"), "--prompt",
             "ROMEO:", "--tokens", "5", "--seed", "1"])
    assert s.returncode == 0, s.stderr
    assert s.stdout.startswith("ROMEO:") and len(s.stdout) > len("ROMEO:")


def test_prepare_cli(tmp_path):
    r = run([PY, "-m", "mpigpt2.prepare", "tinyshakespeare", "--input", str(TEXT),
             "--out-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tiny_shakespeare_val.bin").stat().st_size == 1024 + 2 * 32768


def test_print_schedule(tmp_path, shards):
    r = run(train_cmd(shards, tmp_path / "o", "--print-schedule"))
    assert r.returncode == 0, r.stderr
    assert "rank0" in r.stdout and "0F0.0" in r.stdout
    assert not (tmp_path / "o").exists()
    # the table of a pipeline needs no mpiexec: --pp gives the grid
    r = run(train_cmd(shards, tmp_path / "o", "--print-schedule", "--pp", "2",
                      "--microbatches", "2", "--slice-tokens", "16"))
    assert r.returncode == 0, r.stderr
    assert "rank1" in r.stdout and "1B1.0" in r.stdout and "predicted bubble" in r.stdout


@pytest.fixture
def bad_files(tmp_path):
    """A small-vocabulary model and files with every kind of defect."""
    cfg = GPTConfig(max_seq_len=32, vocab_size=100, padded_vocab_size=128, num_layers=2,
                    num_heads=2, channels=8)
    write_model(str(tmp_path / "small.bin"), cfg, GPT(cfg, seed=0).params)
    write_shard(str(tmp_path / "short.bin"), np.arange(50) % 100)
    (tmp_path / "foreign.bin").write_bytes(b"\x00" * 4096)
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "small.bin").read_bytes()[:-10])
    return tmp_path


BAD = [
    (["--model", "gpt2-huge"], "unknown model preset"),
    (["--model", "{d}/missing.bin"], "cannot read model file"),
    (["--model", "{d}/foreign.bin"], "not an llm.c model file"),
    (["--model", "{d}/trunc.bin"], "truncated"),
    (["--train-data", "{d}/nothing*.bin"], "--train-data"),
    (["--train-data", "{d}/foreign.bin"], "magic"),
    (["--train-data", "{d}/short.bin"], "short.bin"),
    (["--model", "{d}/small.bin"], "vocab"),          # tinyshakespeare ids ≥ V = 100
    (["--seq-len", "512"], "exceeds the model's maximum sequence length"),
    (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--steps", "-1"], "--steps must be ≥ 1"),
    (["--steps", "0"], "--steps must be ≥ 1"),
    (["--threads", "0"], "--threads must be ≥ 1"),
    (["--seq-len", "0"], "--seq-len must be ≥ 1"),
    (["--slice-tokens", "5"], "does not divide --seq-len"),
    (["--slice-tokens", "0"], "--slice-tokens must be ≥ 1"),
    (["--pp", "2"], "does not divide the 1 MPI ranks"),
    (["--pp", "1", "--dp", "2"], "mpiexec started 1 ranks"),
    (["--microbatches", "3"], "not divisible by dp × microbatches"),
    (["--out-dir", "/proc/forbidden"], "--out-dir"),
    (["--lr", "-1"], "optimizer flags"),
    (["--virtual-stages", "3", "--schedule", "interleaved-1f1b"], "do not divide the model's"),
    (["--virtual-stages", "0", "--schedule", "interleaved-1f1b"], "must be ≥ 1"),
    (["--virtual-stages", "3", "--schedule", "zb-v"], "needs --virtual-stages 2"),
    (["--virtual-stages", "2", "--schedule", "1f1b"], "runs one stage per rank"),
    (["--slice-tokens", "16,8"], "sums to 24 tokens, but --seq-len is 32"),
    (["--slice-tokens", "32,0"], "slice 1 has 0 tokens"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input(tmp_path, shards, bad_files, extra, message):
    out = tmp_path / "out"
    extra = [x.replace("{d}", str(bad_files)) for x in extra]
    r = run(train_cmd(shards, out, "--steps", "2", *extra))
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing written


def test_debug_shows_traceback(tmp_path, shards):
    r = run(train_cmd(shards, tmp_path / "o", "--model", "gpt2-huge", "--debug"))
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_small_vocabulary_model_trains_and_samples(tmp_path, bad_files):
    """A model with V < 50257 (no <|endoftext|>): sampling starts from token 0, and the default
    val shard (GPT-2 ids ≥ V) is skipped with a note instead of refusing the run."""
    ids = np.random.default_rng(0).integers(0, 100, 400)
    write_shard(str(tmp_path / "train.bin"), ids)
    default_val = tmp_path / "data" / "tinyshakespeare" / "tiny_shakespeare_val.bin"
    default_val.parent.mkdir(parents=True)
    write_shard(str(default_val), np.full(400, 50256))
    r = run([PY, "-m", "mpigpt2.train", "--model", str(bad_files / "small.bin"), "--train-data",
             str(tmp_path / "train.bin"), "--batch-size", "2", "--seq-len", "16", "--steps", "2",
             "--out-dir", str(tmp_path / "o"), "--save", str(tmp_path / "o" / "m.bin")],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "note: no validation: the default --val-data" in r.stdout, r.stdout
    assert "sample at step 2" in r.stdout and (tmp_path / "o" / "m.bin").exists()


@pytest.mark.parametrize("extra,message", [
    (["--tokens", "40"], "exceed the model's maximum sequence length 32"),
    (["--tokens", "-1"], "must be ≥ 0"),
])
def test_sample_bad_input(bad_files, extra, message):
    r = run([PY, "-m", "mpigpt2.sample", "--model", str(bad_files / "small.bin"), *extra])
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr, r.stderr


def test_sample_top_k_above_vocabulary(bad_files):
    r = run([PY, "-m", "mpigpt2.sample", "--model", str(bad_files / "small.bin"), "--tokens", "5",
             "--top-k", "100000"])
    assert r.returncode == 0, r.stderr

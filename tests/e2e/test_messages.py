"""One clear line and status 2 for the bad inputs of issue 12.9/12.10 that used to give a
traceback or a misleading message, through the real commands."""

import os

import numpy as np
import pytest

from helpers import PY, run


def one_line(r, message):
    assert r.returncode == 2, r.stdout + r.stderr
    err = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("/")]
    assert len(err) == 1 and err[0].startswith("error") and message in err[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def model(module_tmp, shards):
    """A gpt2-tiny .bin written by one training step."""
    d = module_tmp("model")
    r = run([PY, "-m", "mpigpt2.train", "--train-data", str(shards[0]), "--val-data=",
             "--out-dir", str(d / "o"), "--batch-size", "4", "--seq-len", "32", "--steps", "1",
             "--sample-tokens", "0", "--save", str(d / "m.bin")])
    assert r.returncode == 0, r.stderr
    return d / "m.bin"


def test_prepare_out_dir_is_a_file(tmp_path):
    (tmp_path / "ok.txt").write_text("hello world\n")
    (tmp_path / "afile").write_text("keep")
    one_line(run([PY, "-m", "mpigpt2.prepare", "text", str(tmp_path / "ok.txt"), "--out-dir",
                  str(tmp_path / "afile")]), "exists and is not a directory")
    assert (tmp_path / "afile").read_text() == "keep"


def test_prepare_text_given_an_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    one_line(run([PY, "-m", "mpigpt2.prepare", "text", str(tmp_path / "d"), "--out-dir",
                  str(tmp_path / "o")]), "is a directory with no .txt")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,message", [
    (["--hostfile", "/nonexistent/hosts", "--dry-run"], "--hostfile /nonexistent/hosts"),
    (["--threads", "0", "--dry-run"], "--threads must be ≥ 1"),
    (["--threads", "-3", "--dry-run"], "--threads must be ≥ 1"),
    (["-n", "0", "--dry-run"], "-n must be ≥ 1"),
])
def test_launch_flags(flags, message):
    one_line(run([PY, "-m", "mpigpt2.launch", "-n", "2", *flags, "--", "--steps", "1"]),
             message)


@pytest.mark.parametrize("flags,message", [
    (["--prompt", "hello " * 300], "the prompt alone has 301 tokens"),
    (["--prompt", "hello " * 200, "--tokens", "100"], "lower --tokens to 55"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--seed", "-1"], "--seed must be ≥ 0"),
    (["--tokens", "-5"], "--tokens"),
])
def test_sample_flags(model, flags, message):
    one_line(run([PY, "-m", "mpigpt2.sample", "--model", str(model), *flags]), message)


def test_negative_token_count_is_not_called_truncated(tmp_path, shards):
    bad = tmp_path / "neg.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, -5
    bad.write_bytes(header.tobytes() + np.arange(10, dtype="<u2").tobytes())
    r = run([PY, "-m", "mpigpt2.train", "--train-data", str(bad), "--val-data=", "--out-dir",
             str(tmp_path / "o"), "--steps", "1"])
    one_line(r, "token count is -5, negative")
    assert "truncated" not in r.stderr and not os.path.exists(tmp_path / "o")

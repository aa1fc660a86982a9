"""`--slice-tokens auto`: candidates, the TeraPipe prediction, the choice, the profile cache, and
an end-to-end run under mpiexec. No timing is asserted: only that the choice is valid and
consistent with the (measured or given) profile."""

import argparse
import json

import pytest

from helpers import run, mpiexec
from helpers import train_cmd
from mpigpt2.parallel import autotune, costs, layout as lay
from mpigpt2.model.config import GPTConfig, preset

SMALL = GPTConfig(max_seq_len=32, vocab_size=500, padded_vocab_size=512, num_layers=2,
                  num_heads=2, channels=32)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets an empty profile cache (never the user's ~/.cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def two_stages(cfg=SMALL, B=4, T=32, M=2):
    return lay.resolve(2, cfg, B, T, 2, 1, None, M, None, None)


def test_candidates_divide_T_largest_first():
    assert autotune.candidates(32) == [32, 16, 8]
    assert autotune.candidates(64) == [64, 32, 16, 8]
    assert autotune.candidates(48) == [48, 24, 16, 12, 8]
    assert autotune.candidates(6) == [6]  # too short to slice
    assert autotune.candidates(1024)[-1] == 16  # at most MAX_SLICES = 64 slices
    for T in (7, 30, 64, 100, 1024):
        assert all(T % k == 0 for k in autotune.candidates(T))


def test_prediction_by_hand():
    # M·Σt + (p−1)·max t
    assert costs.pipeline_seconds([1.0, 2.0, 3.0], M=2, pp=3) == 2 * 6 + 2 * 3
    assert costs.pipeline_seconds([4.0], M=4, pp=4) == 16 + 12
    assert costs.pipeline_seconds([0.5, 0.5], M=1, pp=1) == 1.0
    # equal slices: the bubble (p−1)/(M·n + p−1) (docs/design.md#schedules-as-data), the
    # same number the step line predicts
    t = [1.0] * 8
    step = costs.pipeline_seconds(t, M=2, pp=4)
    assert (step - 2 * 8) / step == pytest.approx(3 / (2 * 8 + 3))
    assert costs.bubble_fraction(4, 2, 8) == pytest.approx(3 / (2 * 8 + 3))


def test_choice_minimises_the_prediction(monkeypatch):
    fake = {32: [10.0], 16: [4.0, 4.5], 8: [2.2, 2.2, 2.3, 2.4]}
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: dict(fake))
    k, info = autotune.choose(SMALL, two_stages(), 4, 32)
    # M=2, pp=2: k=32: 20+10 = 30; k=16: 17+4.5 = 21.5; k=8: 18.2+2.4 = 20.6
    assert k == 8 and info["slice_tokens"] == 8
    assert info["predicted_step_ms"] == pytest.approx(20600.0)
    assert [c["predicted_step_ms"] for c in info["candidates"]] == \
        pytest.approx([30000.0, 21500.0, 20600.0])
    assert info["source"] == "measured" and "k=8" in autotune.describe(info)


def test_measuring_stops_once_smaller_slices_keep_losing(monkeypatch):
    fake = {128: [10.0], 64: [4.0] * 2, 32: [3.0] * 4, 16: [2.0] * 8, 8: [1.9] * 16}
    seen = []

    def measure(cfg, spec, b, T, ks, dtype, threads, done):
        out = {}
        for k in ks:
            seen.append(k)
            out[k] = fake[k]
            if done(k, out[k]):
                break
        return out
    monkeypatch.setattr(autotune, "measure", measure)
    k, _ = autotune.choose(SMALL, two_stages(T=128), 4, 128)
    # predictions (M=2, pp=2): 30, 20, 27, 34 -> two in a row worse than 20: stop before k=8
    assert seen == [128, 64, 32, 16] and k == 64


def test_pp1_takes_T_without_measuring(monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))
    one = lay.resolve(1, SMALL, 4, 32, 1, 1, None, None, None, None)
    k, info = autotune.choose(SMALL, one, 4, 32)
    assert k == 32 and info["candidates"] == []


def test_bottleneck_is_the_dearest_stage():
    tiny = preset("gpt2-tiny")  # the 50k-vocabulary logits outweigh its layers
    assert autotune.bottleneck_stage(tiny, 64, (3, 1)) == 1
    big = preset("gpt2-124m")
    assert autotune.bottleneck_stage(big, 1024, (2, 8, 2)) == 1
    assert autotune.bottleneck_stage(big, 1024, (2, 6, 4)) == 2  # 4 layers + logits


@pytest.mark.timeout(120)
def test_measures_once_then_reuses_the_cached_profile(monkeypatch):
    layout = two_stages()
    k, info = autotune.choose(SMALL, layout, 4, 32)
    assert info["source"] == "measured"
    assert 32 % k == 0 and k in autotune.candidates(32)
    assert k == min(info["candidates"], key=lambda c: c["predicted_step_ms"])["k"]
    assert all(c["slice_ms_max"] > 0 for c in info["candidates"])
    cache = json.loads(open(autotune.cache_path()).read())
    assert len(cache) == 1

    def no_timer():
        raise AssertionError("measured again instead of using the cache")
    monkeypatch.setattr(autotune, "_clock", no_timer)
    k2, info2 = autotune.choose(SMALL, layout, 4, 32)
    assert (k2, info2["source"]) == (k, "cache")
    assert info2["candidates"] == info["candidates"]
    # another shape is another key: it must measure
    with pytest.raises(AssertionError, match="measured again"):
        autotune.choose(SMALL, two_stages(B=8), 8, 32)


def test_flag_parses_numbers_and_auto():
    from mpigpt2.options import parse_args
    assert parse_args(["--slice-tokens", "auto"]).slice_tokens == "auto"
    assert parse_args(["--slice-tokens", "16"]).slice_tokens == 16
    with pytest.raises(argparse.ArgumentTypeError):
        autotune.parse_slice_tokens("fast")


@pytest.mark.timeout(240)
def test_auto_under_mpi(tmp_path, shards):
    out = tmp_path / "o"
    r = run(mpiexec(2) + train_cmd(shards, out, "--pp", "2", "--slice-tokens", "auto",
                                   "--steps", "2", "--sample-tokens", "0", "--val-steps", "1",
                                   "--no-final-checkpoint", "--peak-gflops", "100"),
            env={"XDG_CACHE_HOME": str(tmp_path / "cache")}, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("autotune: k=") == 1  # rank 0 only
    config = json.loads((out / "config.json").read_text())
    k = config["layout"]["slice_tokens"]
    assert config["autotune"]["slice_tokens"] == k and 32 % k == 0
    assert config["autotune"]["source"] == "measured"
    assert f"autotune: k={k} " in r.stdout and f"M=2 k={k} " in r.stdout
    assert "step     2/2" in r.stdout

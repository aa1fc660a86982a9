"""Random values for every numeric flag of every command (issue 12): the only outcomes are a
run plan (or the command's normal result) and one line with status 2 — never a traceback.
The trainer's flags go through its whole set-up (setup.plan: layout, memory, data, outputs)
in-process, for several world sizes; sample, launch and prepare through their main()."""

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from mpigpt2 import launch, prepare, sample
from mpigpt2.base.errors import UserError
from mpigpt2.options import parse_args
from mpigpt2.setup import plan

INT_FLAGS = ["--batch-size", "--seq-len", "--steps", "--warmup-steps", "--seed", "--val-every",
             "--val-steps", "--sample-every", "--sample-tokens", "--pp", "--dp",
             "--microbatches", "--slice-tokens", "--zero", "--threads", "--checkpoint-every",
             "--keep-checkpoints", "--warmup-report", "--virtual-stages"]
FLOAT_FLAGS = ["--lr", "--beta1", "--beta2", "--eps", "--weight-decay", "--min-lr-frac",
               "--grad-clip", "--peak-gflops", "--stall-seconds", "--wait-timeout"]
NUMBERS = st.one_of(st.integers(-3, 70), st.integers(-2**70, 2**70),
                    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 4096, 10**9]))
TEXTS = st.one_of(NUMBERS.map(str), st.floats().map(repr),
                  st.sampled_from(["nan", "inf", "-inf", "", "abc", "1e3", "0x10", "auto"]))
FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def outcome(fn):
    """'ok', or 'usage' for one error line + status 2; anything else fails the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = fn()
    except SystemExit as e:
        assert e.code == 2, e
        return "usage"
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return "usage"
    if rc == 2:
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        return "usage"
    return "ok"


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(INT_FLAGS + FLOAT_FLAGS), TEXTS),
                      min_size=1, max_size=4),
       world=st.sampled_from([1, 2, 3, 4, 8]))
def test_train_flags_through_the_whole_set_up(shards, tmp_path_factory, flags, world):
    out = tmp_path_factory.mktemp("o")
    argv = ["--train-data", str(shards[0]), "--val-data", str(shards[1]), "--out-dir", str(out),
            "--batch-size", "8", "--seq-len", "32"] + [x for f in flags for x in f]
    outcome(lambda: plan(parse_args(argv), world, list(range(min(world, 2)))))


def test_the_defaults_pass(shards, tmp_path, model):
    """(The fuzz tests above could pass by refusing everything: the plain cases run.)"""
    argv = ["--train-data", str(shards[0]), "--out-dir", str(tmp_path), "--batch-size", "8"]
    assert outcome(lambda: plan(parse_args(argv), 2, [0, 1])) == "ok"
    assert outcome(lambda: sample.main(["--model", str(model), "--tokens", "2"])) == "ok"
    assert outcome(lambda: launch.main(["-n", "2", "--dry-run", "--", "--steps", "1"])) == "ok"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "in.txt"
    p.write_text("To be, or not to be, that is the question.\n" * 20)
    return p


@FUZZ
@given(shard=TEXTS, val=TEXTS)
def test_prepare_flags(text_file, tmp_path_factory, shard, val):
    out = tmp_path_factory.mktemp("p")
    outcome(lambda: prepare.main(["text", str(text_file), "--out-dir", str(out),
                                  "--shard-tokens", shard, "--val-tokens", val]))


@FUZZ
@given(n=TEXTS, threads=TEXTS)
def test_launch_flags(n, threads):
    outcome(lambda: launch.main(["-n", n, "--threads", threads, "--dry-run", "--", "--steps",
                                 "1"]))


@pytest.fixture(scope="module")
def model(module_tmp):
    import numpy as np
    from mpigpt2.formats.llmc import write_model
    from mpigpt2.model.config import preset
    from mpigpt2.model.params import full_spec, init_params, tensor_shapes
    cfg = preset("gpt2-tiny")
    t = {n: np.empty(s, np.float32) for n, s in tensor_shapes(cfg, cfg.num_layers).items()}
    init_params(cfg, full_spec(cfg), t, 0)
    path = module_tmp("m") / "m.bin"
    write_model(str(path), cfg, t)
    return path


@FUZZ
@given(flags=st.lists(st.tuples(st.sampled_from(["--tokens", "--temperature", "--top-k",
                                                 "--seed"]), TEXTS), min_size=1, max_size=3))
def test_sample_flags(model, flags):
    argv = ["--model", str(model), "--tokens", "2"] + [x for f in flags for x in f]
    outcome(lambda: sample.main(argv))

"""Numeric flags: NaN, infinities and out-of-range values end in one error line (status 2)
before anything runs; every finite in-range value is taken as given. Fuzzed with hypothesis."""

import contextlib
import io
import math

import pytest
from hypothesis import given, settings, strategies as st

from mpigpt2.base.errors import UserError
from mpigpt2.options import check_args, parse_args

# flag -> the values it accepts (the trainer's meaning of each)
RANGES = {
    "--lr": lambda x: x >= 0, "--weight-decay": lambda x: x >= 0,
    "--grad-clip": lambda x: x >= 0, "--min-lr-frac": lambda x: 0 <= x <= 1,
    "--eps": lambda x: x > 0, "--stall-seconds": lambda x: x > 0,
    "--wait-timeout": lambda x: x > 0, "--peak-gflops": lambda x: x > 0,
}
TEXTS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-0",
                                   "", "abc", "1,5", "0x10"]),
                  st.text(max_size=8))


def accepts(flag, text):
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parse_args([flag, text])
        check_args(args)
    except SystemExit as e:  # not a number at all: argparse's usage error
        assert e.code == 2
        return None
    except UserError as e:  # a number out of range, NaN or infinite
        assert flag + " must be" in str(e), e
        return None
    return getattr(args, flag[2:].replace("-", "_"))


@pytest.mark.parametrize("flag", sorted(RANGES))
@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_float_flags(flag, text):
    got = accepts(flag, text)
    try:
        want = float(text)
    except ValueError:
        want = None
    ok = want is not None and math.isfinite(want) and RANGES[flag](want)
    if ok:
        assert got == want
    else:
        assert got is None, f"{flag} {text!r} was accepted as {got!r}"


@pytest.mark.parametrize("argv", [["--grad-clip", "-1"], ["--min-lr-frac", "2"],
                                  ["--wait-timeout", "nan"], ["--lr", "inf"], ["--seed", "-1"]])
def test_named_holes_are_one_line_errors(argv):
    with pytest.raises(UserError, match=argv[0] + " must be"):
        check_args(parse_args(argv))

"""argparse types for numeric flags: finite floats with a range, non-negative ints. A NaN or an
infinity is never a meaningful setting (and NaN passes every `<` check), so none gets through."""

import argparse
import math


def _float(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def finite(text):
    """Any finite float."""
    return _float(text)


def nonneg(text):
    """A finite float ≥ 0."""
    x = _float(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return x


def positive(text):
    """A finite float > 0."""
    x = _float(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return x


def fraction(text):
    """A finite float in [0, 1]."""
    x = _float(text)
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return x


def nonneg_int(text):
    """An int ≥ 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return n

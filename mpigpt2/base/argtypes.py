"""Range checks for numeric flags: a NaN or an infinity is never a meaningful setting (and NaN
passes every `<` check), so each float flag is checked for being finite and in its range, with
one clear line (UserError, status 2)."""

import math

from mpigpt2.base.errors import UserError


def check_number(flag, x, lo=None, lo_open=False, hi=None):
    """Raise UserError unless x is finite and lo ≤ x (lo < x if lo_open) and x ≤ hi."""
    if x is None:
        return
    rng = []
    if lo is not None:
        rng.append(f"{'>' if lo_open else '≥'} {lo:g}")
    if hi is not None:
        rng.append(f"≤ {hi:g}")
    want = f"{flag} must be a finite number" + (f" {' and '.join(rng)}" if rng else "")
    if not math.isfinite(x):
        raise UserError(f"{want}, got {x}")
    if lo is not None and (x <= lo if lo_open else x < lo):
        raise UserError(f"{flag} must be {rng[0]}, got {x:g}")
    if hi is not None and x > hi:
        raise UserError(f"{flag} must be ≤ {hi:g}, got {x:g}")

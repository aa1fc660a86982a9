"""Fused loops (numba) for the memory-bound parts of ops.py: the code is in model/loops.py,
compiled() hands the loops out.

Each loop does in one or two passes over memory what a chain of numpy ufuncs did in several,
with the same operations in the same order on the array dtype: compiled without fastmath (no
FMA contraction, no reassociation), so every product and sum rounds as the ufunc chain
rounded. The elementwise GELU loops are bit-identical to their chains; the row sums of
LayerNorm and of the attention softmax run in 16 interleaved partial sums (a fixed order, as
numpy's pairwise sums are), so those differ from numpy by float ulps (tests/unit/
test_kernels.py). Transcendentals stay numpy's (its tanh/exp are vectorised; numba's would be
scalar libm calls). Scalars are passed in the array dtype so that no float64 literal widens a
float32 loop. (docs/design.md#fused-elementwise-loops)
"""

import contextlib
import functools
import glob
import os

# numba's cache files of the loops as they were before model/loops.py: closures in this module,
# re-cached by every process (one more file each time, never read again). Migration code: no
# function here may be named _dot, _gelu, _layernorm or _scores again; drop this in a while.
STALE_CACHES = ("kernels._dot.locals.*.nb[ci]", "kernels._gelu.locals.*.nb[ci]",
                "kernels._layernorm.locals.*.nb[ci]", "kernels._scores.locals.*.nb[ci]")


@functools.cache
def compiled():
    """Every loop by name (model/loops.py; numba is imported here, at the first use)."""
    from mpigpt2.model import loops
    _drop_stale_caches(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__"))
    return {name: getattr(loops, name) for name in loops.NAMES}


def _drop_stale_caches(cache_dir):
    """Remove STALE_CACHES from cache_dir (left by earlier versions; nothing reads them)."""
    for pattern in STALE_CACHES:
        for path in glob.glob(os.path.join(cache_dir, pattern)):
            with contextlib.suppress(OSError):  # another rank was first, or read-only
                os.unlink(path)

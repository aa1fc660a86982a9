"""Keep freed activation memory inside the process.

glibc returns big freed blocks to the kernel (munmap, heap trimming), so the large temporaries
of every step (attention scores, MLP activations, logits) are page-faulted in again each step:
measured up to a quarter of a step in kernel time. Raising the mmap threshold to its maximum and
disabling trimming keeps that memory mapped. Linux/glibc only; elsewhere a no-op.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (larger values are refused)


def tune():
    """Returns True when glibc accepted the settings."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
                                               (M_TRIM_THRESHOLD, 2 ** 31 - 1),
                                               (M_TOP_PAD, 256 << 20)))

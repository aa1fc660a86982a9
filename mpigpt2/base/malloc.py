"""Keep freed activation memory inside the process.

glibc returns big freed blocks to the kernel (munmap, heap trimming), so the large temporaries
of every step (attention scores, MLP activations, logits) are page-faulted in again each step:
measured up to a quarter of a step in kernel time. Serving every block from the heap and never
trimming it keeps that memory mapped (the process keeps its peak footprint, which it needs every
step anyway). Linux/glibc only; elsewhere a no-op. (docs/design.md#a-heap-that-keeps-its-pages)
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (larger values are refused)
# (parameter, value); a trim threshold of -1 turns trimming off (mallopt(3))
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1),
            (M_TOP_PAD, 256 << 20))


def _libc_function(name):
    """glibc's function `name`, or None (no C library found, or not glibc)."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name) if lib else None
    except (OSError, AttributeError):
        return None


def tune():
    """Returns True when glibc accepted the settings."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # blocks above the mmap threshold (32 MiB at most: the logits of B·T ≥ 170 tokens of
    # GPT-2, attention scores and MLP activations of larger batches) would still be mapped
    # and faulted in afresh every step — measured 1-1.5 s of a 20 s GPT-2 124M step at
    # B=8 T=256 — so take every block from the heap (M_MMAP_MAX = 0) and never trim it
    return all(mallopt(p, v) == 1 for p, v in SETTINGS)


def release():
    """Give freed heap memory back to the kernel (malloc_trim): after a checkpoint or a sample,
    whose gathered full-model buffers on rank 0 would otherwise stay resident for the rest of
    the run. The next step's temporaries fault in once again."""
    malloc_trim = _libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))

"""Which OpenBLAS kernels numpy's matmuls run: chosen once, before numpy loads
(docs/design.md#blas-kernels).

OpenBLAS (numpy's BLAS from pip) picks a kernel set when the library loads, from the CPU it sees;
the environment variable OPENBLAS_CORETYPE overrides the pick. On AMD Zen 4 (CPU family 25 with
AVX-512) OpenBLAS 0.3.31 picks its SkylakeX (AVX-512) kernels; Zen 4 executes 512-bit vectors as
two 256-bit halves, and OpenBLAS's own AVX2 kernels for Zen ran GPT-2's float32 matmuls 5-20 %
faster there (side by side: 104 vs 96 GFLOP/s at 256 rows, 109 vs 103 at 2048, 86-88 vs 69-78 at 64;
bench row 2 measures both on every host). So on such a CPU we ask for the Zen kernels.

A user's OPENBLAS_CORETYPE (even empty: OpenBLAS's own pick) is never overridden. Nothing is set
once numpy is loaded: the library has chosen already, and child processes, which inherit the
environment, must run the kernels of their parent (a test comparing the two bit for bit would
otherwise compare two kernels).

This module imports nothing heavy: mpigpt2/__init__.py runs it before anything imports numpy.
"""

import os
import sys

from mpigpt2.base.machine import cpuinfo_fields

VARIABLE = "OPENBLAS_CORETYPE"
MARK = "MPIGPT2_OPENBLAS_CORETYPE"  # what select() set, so its children can tell it from a user's
ZEN = "ZEN"  # OpenBLAS's target for AMD Zen: its AVX2 (Haswell-family) kernels


def cpu_facts(text=None):
    """(vendor, family, flags) of the first processor in /proc/cpuinfo (or in its text); (None,
    None, ()) where it does not say."""
    fields = cpuinfo_fields(text)
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        family = None
    return fields.get("vendor_id"), family, tuple(fields.get("flags", "").split())


def preferred_coretype(vendor, family, flags):
    """The kernels we ask OpenBLAS for on this CPU, or None to keep its own pick: "ZEN" on AMD
    family 25 (Zen 3 and Zen 4) with AVX-512, i.e. Zen 4 (Zen 3 has no AVX-512 and already gets
    the Zen kernels; Zen 5, family 26, has full-width AVX-512 units and keeps OpenBLAS's pick)."""
    if vendor == "AuthenticAMD" and family == 25 and "avx512f" in flags:
        return ZEN
    return None


def select(environ=None, modules=None, cpuinfo=None):
    """Set OPENBLAS_CORETYPE in environ (default os.environ) when we prefer a kernel set, the user
    has not chosen one and numpy is not loaded yet. Returns why the kernels are what they are, in
    words for the start-up line.

    A value a parent mpigpt2 process set (MARK says so) is decided again for this CPU: the parent
    may be a launcher on another kind of node."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    ours = f"{VARIABLE}={{}}: on AMD Zen 4 the AVX2 kernels measure faster than the AVX-512 ones"
    inherited = VARIABLE in environ and environ.get(MARK) == environ[VARIABLE]
    if VARIABLE in environ and not inherited:
        return f"{VARIABLE}={environ[VARIABLE]!r} set by the user"
    want = preferred_coretype(*cpu_facts(cpuinfo))
    if "numpy" in modules:  # the library has chosen already, by what the environment held
        if inherited:
            return ours.format(environ[VARIABLE])
        if want is not None:
            return f"OpenBLAS's own pick: numpy was loaded before mpigpt2 could ask for {want}"
        return "OpenBLAS's own pick for this CPU"
    if want is None:
        if inherited:  # chosen for another CPU (a launcher on another kind of node): undone
            del environ[VARIABLE], environ[MARK]
        return "OpenBLAS's own pick for this CPU"
    environ[VARIABLE] = environ[MARK] = want
    return ours.format(want)


# what select() decided when mpigpt2 was imported (set by mpigpt2/__init__.py)
CHOICE = None


def info():
    """The BLAS numpy runs as threadpoolctl sees it, and why its kernels are these (config.json)."""
    from threadpoolctl import threadpool_info
    libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    lib = libs[0] if libs else {}
    return {"library": lib.get("internal_api"), "version": lib.get("version"),
            "kernels": lib.get("architecture"), "why": CHOICE}


def describe(got=None):
    """One line for the start-up report: the BLAS numpy runs, its kernels, and why."""
    got = info() if got is None else got
    if got["library"] is None:
        return f"blas: none found by threadpoolctl; {got['why']}"
    return (f"blas: {got['library']} {got['version']}, {got['kernels'] or 'unknown'} kernels; "
            f"{got['why']}")

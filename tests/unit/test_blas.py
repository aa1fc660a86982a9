"""numpy's BLAS kernels: mpigpt2 asks OpenBLAS for its Zen kernels on AMD Zen 4, before numpy
loads, and never against the user's choice (mpigpt2/base/blas.py)."""

import json
import os
import subprocess
import sys

import pytest

from mpigpt2.base import blas

ZEN4 = """processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC 9R14 96-Core Processor
flags		: fpu vme sse sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl

processor	: 1
vendor_id	: GenuineIntel
cpu family	: 6
"""
ZEN3 = ZEN4.replace("model\t\t: 17", "model\t\t: 1").replace(" avx512f avx512dq avx512bw avx512vl", "")
ZEN5 = ZEN4.replace("cpu family\t: 25", "cpu family\t: 26")
INTEL = (ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family\t: 25", "cpu family\t: 6"))


def test_cpu_facts_reads_the_first_processor():
    assert blas.cpu_facts(ZEN4) == ("AuthenticAMD", 25, ("fpu", "vme", "sse", "sse2", "avx",
                                                          "avx2", "fma", "avx512f", "avx512dq",
                                                          "avx512bw", "avx512vl"))
    assert blas.cpu_facts("") == (None, None, ())
    assert blas.cpu_facts("vendor_id : X\ncpu family : ?\n") == ("X", None, ())


@pytest.mark.parametrize("text, want", [(ZEN4, "ZEN"), (ZEN3, None), (ZEN5, None), (INTEL, None),
                                        ("", None)])
def test_only_zen4_gets_the_zen_kernels(text, want):
    assert blas.preferred_coretype(*blas.cpu_facts(text)) == want


def test_select_sets_the_variable_only_when_it_is_ours_to_set():
    env = {}
    why = blas.select(env, modules={}, cpuinfo=ZEN4)
    assert env == {"OPENBLAS_CORETYPE": "ZEN", blas.MARK: "ZEN"} and "Zen 4" in why
    child = dict(env)  # a process started by this one inherits the choice and knows it for ours
    assert blas.select(child, modules={}, cpuinfo=ZEN4) == why and child == env
    child = dict(env)  # ... and decides again on another kind of CPU (a launcher elsewhere)
    assert blas.select(child, modules={}, cpuinfo=INTEL) == "OpenBLAS's own pick for this CPU"
    assert child == {}
    child = dict(env)  # too late to undo: the library loaded with the inherited value
    assert blas.select(child, modules={"numpy": object()}, cpuinfo=INTEL) == why
    assert child == env
    for user in ("", "SKYLAKEX"):  # the user's choice stands, even "" (OpenBLAS's own pick)
        for env in ({"OPENBLAS_CORETYPE": user}, {"OPENBLAS_CORETYPE": user, blas.MARK: "ZEN"}):
            kept = dict(env)
            assert "set by the user" in blas.select(env, modules={}, cpuinfo=ZEN4)
            assert env == kept
    env = {}  # too late: the library has chosen, and children must run what the parent runs
    assert "numpy was loaded" in blas.select(env, modules={"numpy": object()}, cpuinfo=ZEN4)
    assert env == {}
    for text in (INTEL, ZEN3, ""):
        env = {}
        assert blas.select(env, modules={}, cpuinfo=text) == "OpenBLAS's own pick for this CPU"
        assert env == {}


def _kernels(code, **env):
    """What a fresh interpreter running code (which then loads numpy) reports: blas.info()."""
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", blas.MARK)}
    out = subprocess.run([sys.executable, "-c", code + "\nimport numpy\nimport json\n"
                          "from mpigpt2.base import blas\nprint(json.dumps(blas.info()))"],
                         env={**base, **env}, capture_output=True, text=True, timeout=120,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_the_choice_reaches_openblas():
    """In a fresh interpreter, select() before numpy loads changes the kernels OpenBLAS runs to
    what OPENBLAS_CORETYPE=ZEN gives, whatever this host is; after numpy loads it changes
    nothing. (Loading blas.py by path keeps the package's own choice out of the way.)"""
    load = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {blas.__file__!r})\n"
            "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n")
    zen4 = f"b.select(cpuinfo={ZEN4!r})\n"
    forced = _kernels("import mpigpt2", OPENBLAS_CORETYPE="ZEN")["kernels"]
    native = _kernels("import mpigpt2", OPENBLAS_CORETYPE="")["kernels"]
    assert forced and native
    assert _kernels(load + zen4)["kernels"] == forced
    assert _kernels("import numpy\n" + load + zen4)["kernels"] == native
    assert _kernels(load + f"b.select(cpuinfo={INTEL!r})\n")["kernels"] == native


def test_the_package_chooses_on_import_and_says_why():
    got = _kernels("import mpigpt2")
    assert got["library"] == "openblas" and got["why"] == blas.select({}, {}, cpuinfo=None)
    assert blas.describe(got).startswith(f"blas: openblas {got['version']}, {got['kernels']} ")


def test_cached_measurements_are_keyed_by_the_kernels(monkeypatch):
    """The matmul peak, the step-model calibration and the slice autotuner's cache all key by
    the kernels: a measurement under one kernel set is not reused under another."""
    from mpigpt2.base import machine
    from mpigpt2.model.config import PRESETS
    from mpigpt2.observe import peak
    from mpigpt2.parallel import calibrate
    keys = {}
    for value in ("ZEN", ""):
        monkeypatch.setenv("OPENBLAS_CORETYPE", value)
        keys[value] = (peak.cache_key(), calibrate.key(PRESETS["gpt2-tiny"], "float32"))
        assert keys[value][0] == machine.compute_key() and keys[value][1].endswith(keys[value][0])
    assert keys["ZEN"][0] != keys[""][0] and keys["ZEN"][1] != keys[""][1]

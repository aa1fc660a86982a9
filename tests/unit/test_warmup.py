"""model/warmup.py: set-up's tiny training step loads every compiled loop that a real step
uses, with the same argument types, so step 0 compiles and loads nothing (a stall report at
step 0 is then a real stall). Checked in a fresh interpreter by numba's own record of the
signatures each loop has been compiled (or loaded) for, before and after a real step."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import numpy as np
from mpigpt2.model import kernels, optim
from mpigpt2.model.config import PRESETS
from mpigpt2.model.gpt import GPT
from mpigpt2.model.warmup import warm_up
dtype = np.dtype(sys.argv[1])
loops = {**kernels.compiled(), "adamw": optim._fused_kernel()}
def signatures():
    return {name: sorted(map(str, d.signatures)) for name, d in loops.items()}
fresh = signatures()
warm_up(dtype)
warmed = signatures()
model = GPT(PRESETS["gpt2-tiny"], dtype, seed=1)
x = np.random.default_rng(0).integers(0, 50257, (2, 64)).astype(np.int32)
model.forward(x, x)
model.backward()
optim.AdamW(model.flat.size, dtype).step(model.flat, model.grad_flat, 1, 3e-4)
print(json.dumps({"fresh": fresh, "warmed": warmed, "after": signatures()}))
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_real_step_after_warm_up_needs_no_new_loop(dtype):
    out = subprocess.run([sys.executable, "-c", PROBE, dtype], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    got = json.loads(out)
    assert not any(got["fresh"].values())  # nothing loaded before the warm-up
    assert all(got["warmed"].values()), got["warmed"]  # every loop loaded by it
    assert got["after"] == got["warmed"]  # and the real step needed nothing more


CACHE_PROBE = r"""
import json
import numpy as np
from mpigpt2.model import kernels, optim
from mpigpt2.model.warmup import warm_up
warm_up(np.float32)
loops = {**kernels.compiled(), "adamw": optim._fused_kernel()}
print(json.dumps({name: [sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()),
                         d.stats.cache_path] for name, d in loops.items()}))
"""


def test_every_loop_loads_from_the_disk_cache_in_the_next_process():
    """A second process compiles nothing and adds no cache file: every loop (and each loop's
    callees) is found in numba's cache. A loop that reached `dot` through a closure missed in
    every process, cost ~1.4 s per start and left one more file each time."""
    def probe():
        out = subprocess.run([sys.executable, "-c", CACHE_PROBE], capture_output=True,
                             text=True, timeout=300, check=True).stdout
        return json.loads(out)
    first = probe()  # compiles whatever is not cached yet (a fresh clone: everything)
    cache_dir = next(iter(first.values()))[2]
    files = sorted(os.listdir(cache_dir))
    second = probe()
    assert {name: misses for name, (_, misses, _) in second.items() if misses} == {}
    assert all(hits for hits, _, _ in second.values()), second
    assert sorted(os.listdir(cache_dir)) == files

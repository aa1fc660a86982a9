"""base/malloc.py keeps what a step frees in the heap (docs/design.md#a-heap-that-keeps-its-pages):
after tune(), a second step-sized round of allocations is not page-faulted in again, where
glibc's defaults fault it in afresh. Each case runs in its own interpreter: malloc's settings
are per process."""

import json
import subprocess
import sys

# a "step": allocate and touch `blocks` arrays of 256 MiB, then free them all (newest first, as
# backward frees the activations); then count the page faults of a second step
PROBE = r"""
import json, resource, sys
import numpy as np
from mpigpt2.base import malloc
tuned = malloc.tune() if sys.argv[1] == "tune" else None
blocks = int(sys.argv[2])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():
    held = []
    for _ in range(blocks):
        held.append(np.empty(64 << 20, np.float32))
        held[-1].fill(1.0)
    while held:
        held.pop()
step()
f0 = faults()
step()
print(json.dumps({"tuned": tuned, "faults": faults() - f0}))
"""


def probe(mode, blocks):
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(blocks)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out)


def test_a_freed_step_is_not_faulted_in_again():
    """One 256 MiB block: above glibc's mmap threshold, as the logits of a GPT-2 step are."""
    tuned, default = probe("tune", 1), probe("default", 1)
    assert tuned["tuned"] is True
    # 256 MiB is 128 transparent huge pages or 65,536 small ones when faulted in again
    assert default["faults"] >= 100, default
    assert tuned["faults"] <= 8, tuned


def test_more_than_two_gib_freed_at_once_stays_too():
    """~4 GiB of activations are freed by a B=8 T=256 step's backward; a trim threshold (the
    largest mallopt takes is 2 GiB) would give them back to the kernel at the end of every
    step. Nine blocks: 2.25 GiB."""
    assert probe("tune", 9)["faults"] <= 8 * 9

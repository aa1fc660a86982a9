"""Fault injection for the failure tests, installed once before the loop, never inside it.

--inject-error RANK:STEP raises on that rank at that step, --inject-delay RANK:STEP:SECONDS
sleeps there (a stall), MPIGPT2_TEST_CRASH_IN_CHECKPOINT=STEP kills the process half-way
through writing that step's checkpoint. Without them nothing here is called.
"""

import os
import time

from mpigpt2.formats import checkpoint


def wrap_batches(next_batch, args, rank):
    """next_batch(step) with the injected error or delay of --inject-error/--inject-delay."""
    error = tuple(int(v) for v in args.inject_error.split(":")) if args.inject_error else None
    delay = tuple(float(v) for v in args.inject_delay.split(":")) if args.inject_delay else None
    if error is None and delay is None:
        return next_batch

    def faulty(step):
        batch = next_batch(step)
        if error == (rank, step):
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        if delay is not None and (delay[0], delay[1]) == (rank, step):
            time.sleep(delay[2])
        return batch
    return faulty


def install_checkpoint_crash():
    """MPIGPT2_TEST_CRASH_IN_CHECKPOINT=STEP: exit(9) after the first file of that step's
    checkpoint (its temp directory must then be ignored and cleaned by the next run)."""
    step = os.environ.get("MPIGPT2_TEST_CRASH_IN_CHECKPOINT")
    if step is None:
        return
    write_model = checkpoint.write_model

    def crashing(path, cfg, tensors, fp64=False):
        write_model(path, cfg, tensors, fp64=fp64)
        if os.path.basename(os.path.dirname(path)) == f".tmp-step_{int(step):08d}":
            os._exit(9)
    checkpoint.write_model = crashing

"""One training step: the only one. mpigpt2.train, the MPI parity matrix and the benchmarks
all call train_step (docs/design.md#schedules-as-data for what Runner.run executes)."""

import math
import time
from dataclasses import dataclass
from typing import Optional

from mpigpt2.model.optim import clip_scale


@dataclass
class StepResult:
    loss_sum: float             # this rank's sum of per-token losses (last stage; 0 elsewhere)
    grad_norm: Optional[float]  # global gradient norm before clipping (None: not asked for)
                                # non-finite: the update was skipped
    scale: float                # the clipping multiplier applied (1: none)
    times: dict                 # seconds by phase (observe.metrics.PHASES)
    waits: dict                 # seconds spent waiting, by kind (waiting.Waiter)
    action_seconds: list = None  # seconds of each compute action, in program order
    pipeline_s: float = 0.0     # start of the schedule to the end of this rank's last compute


def train_step(runner, opt, tokens, targets, t, lr, dloss, grad_clip=0.0, norm=False):
    """Forward, backward and gradient reduction over the schedule, optional global-norm
    clipping, then the optimizer update with 1-based step count t.

    tokens/targets: (M, b, T) micro-batches of this replica (read on the first/last stage).
    dloss: the loss gradient per token, 1/(B·T) of the global batch. norm: compute the
    gradient norm even without clipping (one small allreduce).
    """
    stage, waiter = runner.stage, runner.grid.waiter
    stage.zero_grad()
    waiter.take()
    runner.take_times()  # (validation between steps is not this step's time)
    runner.take_action_seconds()
    loss_sum = runner.run(tokens, targets, dloss)
    grad_norm = opt.grad_norm() if grad_clip > 0 or norm else None
    finite = grad_norm is None or math.isfinite(grad_norm)
    scale = clip_scale(grad_norm, grad_clip) if grad_clip > 0 and finite else 1.0
    t_up = time.perf_counter()
    if finite:  # a NaN/inf gradient never reaches the weights (the caller stops the run)
        opt.step(t, lr, scale)
    t_done = time.perf_counter()
    if runner.tracer is not None:
        runner.tracer.span("update", "update", t_up, t_done)
    times, waits = runner.take_times(), waiter.take()
    actions = runner.take_action_seconds()
    gathered = waits.get("allgather", 0.0)  # ZeRO's parameter waits happen inside forward
    times["forward"] = times.get("forward", 0.0) - gathered
    times.update(update=t_done - t_up, allgather=gathered)
    return StepResult(loss_sum, grad_norm, scale, times, waits, actions,
                      runner.pipeline_seconds)

"""The two optimizers a training step drives: replicated AdamW (--zero 0) and ZeRO-1 (--zero 1).

Both offer the same interface to parallel.step.train_step and the commands: grad_norm() (the
global gradient norm, the tied wte counted once), step(t, lr, scale), sync(), full_moments(),
moment_buffers(), set_moments(m, v), nbytes, and reducer (the gradient reducer the Runner calls at REDUCE).
"""

import numpy as np

from mpigpt2.model.optim import AdamW
from mpigpt2.parallel.collectives import GradReducer, allreduce_sum
from mpigpt2.parallel.shared import SharedAdam
from mpigpt2.parallel.zero import ShardedAdam


class ReplicatedAdam:
    """--zero 0: every replica keeps the whole AdamW state of its stage."""

    def __init__(self, grid, stage, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 hierarchical=False, node_id=None):
        self.grid, self.stage = grid, stage
        self.adam = AdamW(stage.layout.size, stage.dtype, beta1, beta2, eps, weight_decay)
        self.reducer = GradReducer(grid, stage, hierarchical, node_id)

    def grad_norm(self):
        """Global norm of the reduced gradient: every replica holds it whole, so the pipe
        suffices. wte sits on the first and last stage when pp > 1: the last leaves it out."""
        st = self.stage
        if st.spec.last and not st.spec.first:
            sumsq = sum(float(g.ravel() @ g.ravel()) for n, g in st.g.items() if n != "wte")
        else:
            sumsq = float(st.grad_flat @ st.grad_flat)
        return float(np.sqrt(allreduce_sum(self.grid.pipe, [sumsq], self.grid.waiter)[0]))

    def step(self, t, lr, grad_scale=1.0):
        self.adam.step(self.stage.flat, self.stage.grad_flat, t, lr, grad_scale)

    def sync(self):
        """Nothing in flight after a replicated update."""

    def loaded(self):
        """The stage's parameters were written (initialised, loaded, resumed): they are this
        rank's own copy already."""

    def full_moments(self):
        return self.adam.m, self.adam.v

    def moment_buffers(self):
        """Stage-sized arrays a checkpoint's moments are read into (then set_moments)."""
        return self.adam.m, self.adam.v

    def set_moments(self, m_full, v_full):
        if m_full is not self.adam.m:
            self.adam.m[...] = m_full
        if v_full is not self.adam.v:
            self.adam.v[...] = v_full

    @property
    def nbytes(self):
        return self.adam.m.nbytes + self.adam.v.nbytes

    @property
    def param_bytes(self):
        return self.stage.flat.nbytes


class ZeroAdam(ShardedAdam):
    """--zero 1: ShardedAdam with the common interface (it is its own gradient reducer)."""

    def __init__(self, grid, stage, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 overlap=True):
        super().__init__(grid, stage, beta1, beta2, eps, weight_decay)
        self.overlap = overlap  # broadcast updated layers while the next forward runs
        self.reducer = self
        stage.before_use = self.wait_param

    def grad_norm(self):
        """The shards partition every stage (wte once): sum over the whole grid."""
        return float(np.sqrt(allreduce_sum(self.grid.world, [self.grad_sumsq()],
                                           self.grid.waiter)[0]))

    def step(self, t, lr, grad_scale=1.0):
        super().step(t, lr, grad_scale, overlap=self.overlap)

    def moment_buffers(self):
        """Stage-sized arrays a checkpoint's moments are read into (set_moments keeps the
        shards)."""
        return np.empty_like(self.stage.flat), np.empty_like(self.stage.flat)

    def loaded(self):
        """The stage's parameters were written: every rank holds them whole already."""

    @property
    def param_bytes(self):
        return self.stage.flat.nbytes


def make_optimizer(grid, stage, zero=0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                   overlap=True, hierarchical=False, node_id=None, shared=False):
    """The optimizer of --zero `zero` over this rank's stage; hierarchical: reduce the
    replicated optimizer's gradients node by node; shared: node-shared data parallelism
    (docs/design.md#node-shared-data-parallelism). Nodes are told by shared memory or by
    node_id (ZeRO-1 reduce-scatters with MPI's own). Call loaded() once the stage's
    parameters are written."""
    hyper = (beta1, beta2, eps, weight_decay)
    if shared:
        return SharedAdam(grid, stage, *hyper, node_id=node_id)
    if zero:
        return ZeroAdam(grid, stage, *hyper, overlap)
    return ReplicatedAdam(grid, stage, *hyper, hierarchical, node_id)

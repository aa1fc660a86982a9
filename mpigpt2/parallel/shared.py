"""Node-shared data parallelism (--shared-dp): the replicas of a stage that share a node keep one
copy of its parameters and Adam moments in MPI-3 shared memory and sum their gradients in place
(docs/design.md#node-shared-data-parallelism).

On a node, the n ranks of a data group (its "locals", local rank i = 0..n-1 in replica order)
map four windows: the parameters (N), Adam's m and v (N each) and n gradient slots (n·N; local
rank j's backward writes slot j). Every reduction bucket (a layer's 12 tensors, or wte, wpe,
lnf) is cut into n slices; local rank i owns slice i of each. When all locals have finished a
bucket (a polled node barrier), rank i sums its slices over the slots in slot order into slot 0
(one memory-bound pass, no MPI copy), allreduces them with the ranks of the same local index on
the other nodes ("cross"; for the tied wte of pp > 1 also with the other wte stage), updates
them with its own slice of m and v, and a node barrier publishes the parameters: ZeRO-1 inside
a node for free, and no parameter traffic inside a node at all.
"""

import functools

import numpy as np
from mpi4py import MPI

from mpigpt2.model.optim import AdamW
from mpigpt2.parallel.collectives import allreduce_sum, barrier, split_by_node
from mpigpt2.base.machine import shm_room
from mpigpt2.parallel.layout import common_replicas
from mpigpt2.parallel.memory import shm_fits, state_bytes
from mpigpt2.parallel.zero import buckets, shard_bounds


NO_DATA_PARALLELISM = "no data parallelism"  # choose()'s reason when there is nothing to share
SUM_BLOCK = 2048  # elements summed per block: slot 0's block stays in L1 while slots add in


@functools.cache
def _sum_kernel():
    """slots[0, lo:hi] = slots[0] + slots[1] + … + slots[n-1] over [lo, hi), added in slot
    order (each element: ((g0 + g1) + g2) + …), block by block so that the adds vectorise
    and slot 0's block is read and written once (measured 4× faster at n = 2 than one
    element at a time over the slots)."""
    from numba import njit

    @njit(cache=True, nogil=True, boundscheck=False)
    def sum_slots(slots, lo, hi, block):
        n = slots.shape[0]
        for a in range(lo, hi, block):
            b = min(a + block, hi)
            for j in range(1, n):
                for x in range(a, b):
                    slots[0, x] += slots[j, x]

    return sum_slots


class SharedBuffer:
    """`count` elements of dtype in one MPI-3 shared window over comm (all on its rank 0), as an
    array every rank of comm maps. MPICH backs it with a /dev/shm file it unlinks at once, so
    the memory is released when the last process holding it ends, however it ends."""

    def __init__(self, comm, count, dtype):
        itemsize = np.dtype(dtype).itemsize
        self.win = MPI.Win.Allocate_shared(count * itemsize if comm.Get_rank() == 0 else 0,
                                           itemsize, comm=comm)
        buf, _ = self.win.Shared_query(0)
        self.array = np.ndarray(buffer=buf, dtype=dtype, shape=(count,))
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch for Sync (memory barrier)

    def sync(self):
        self.win.Sync()


def node_groups(comm, color=None):
    """(locals, cross) of comm: the ranks sharing this rank's node (or colour), ordered by
    their rank in comm, and the ranks with this rank's local index on every node."""
    local = split_by_node(comm, color)
    return local, comm.Split(local.Get_rank(), comm.Get_rank())


def window_counts(n, N):
    """Elements of the four windows one data group's n locals share for a stage of N
    parameters: parameters, m, v and n gradient slots (SharedAdam allocates exactly these)."""
    return N, N, N, n * N


def node_bytes(n, N, itemsize):
    """Shared bytes of one data group's locals (what memory.state_bytes must add up to)."""
    return sum(window_counts(n, N)) * itemsize


class SharedAdam:
    """The optimizer of --shared-dp on, and its own gradient reducer (start_layer, start_rest,
    wait: the interface of collectives.GradReducer)."""

    def __init__(self, grid, stage, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 node_id=None):
        self.grid, self.stage = grid, stage
        N, dt = stage.layout.size, stage.dtype
        self.tied = "wte" in stage.layout.shapes and grid.pp > 1
        with grid.waiter.bounded("the node-shared windows (Comm_split, Win_allocate_shared)"):
            self.local, self.cross = node_groups(grid.data, node_id)
            n, li = self.n, self.li = self.local.Get_size(), self.local.Get_rank()
            # the tied wte: summed with the same local index of both wte stages, every node
            self.ecross = (grid.embed.Split(li, grid.embed.Get_rank()) if self.tied else None)
            self.bufs = [SharedBuffer(self.local, c, dt) for c in window_counts(n, N)]
        self.params, self.m, self.v = (b.array for b in self.bufs[:3])
        self.slots = self.bufs[3].array.reshape(n, N)
        self.sum = self.slots[0]  # the reduced gradient, after wait()
        if li == 0:
            self.m[...] = 0.0
            self.v[...] = 0.0
        stage.rebind(grad_flat=self.slots[li])
        self.ranges = {}  # bucket key -> [(tensor, lo, hi, cross comm)]: my slices
        self.keys = buckets(stage.layout, stage.nl)
        for key, segs in self.keys.items():
            for name, a, b in segs:
                lo, hi = shard_bounds(b - a, n)[li]
                comm = self.ecross if name == "wte" and self.tied else self.cross
                self.ranges.setdefault(key, []).extend([(name, a + lo, a + hi, comm)]
                                                       if hi > lo else [])
        hyper = (beta1, beta2, eps, weight_decay)
        self.adams = [(lo, hi, AdamW(hi - lo, dt, *hyper, moments=(self.m[lo:hi],
                                                                   self.v[lo:hi])))
                      for rs in self.ranges.values() for _, lo, hi, _ in rs]
        self.reducer = self
        self.reqs = []  # the cross-node allreduces in flight

    # -- gradients ------------------------------------------------------------------------------
    def start_layer(self, key):
        """A bucket is final on this rank: nothing to start. Summing a layer's slices as soon
        as every local had finished it (a node barrier per layer, progressed during the
        backward) measured no faster on a 2-core node (the cores are busy with the backward
        either way): the whole reduction runs in wait() (docs/design.md#node-shared-data-
        parallelism)."""

    def start_rest(self):
        """After the whole backward: nothing to start either (see start_layer)."""

    def wait(self):
        """Once every local has written its slot (a node barrier): sum my slices bucket by
        bucket, starting each bucket's cross-node allreduces as soon as it is summed (in one
        order on every node), then wait for them."""
        self.stage.finish_grads()  # (the whole slot: a group never written reads zero)
        self.bufs[3].sync()  # my slot's writes before the barrier that announces them
        barrier(self.local, self.grid.waiter, "allreduce",
                "the in-node gradient reduction (every local's backward)")
        self.bufs[3].sync()

        def what():
            return f"{len(self.reqs)} gradient allreduces between nodes"
        for key in self.keys:
            for _, lo, hi, comm in self.ranges.get(key, ()):
                _sum_kernel()(self.slots, lo, hi, SUM_BLOCK)
                if comm.Get_size() > 1:
                    self.reqs.append(comm.Iallreduce(MPI.IN_PLACE, self.sum[lo:hi],
                                                     op=MPI.SUM))
            if self.reqs:  # progress the allreduces already started
                self.grid.waiter.checked(MPI.Request.Testall, self.reqs, "allreduce", what)
        self.grid.waiter.wait(self.reqs, "allreduce", what)
        self.reqs = []

    def full_grad(self):
        """The stage-sized summed gradient of the last step (slot 0 once every local has
        summed its slices: a node barrier)."""
        self._publish()
        return self.sum

    # -- the optimizer --------------------------------------------------------------------------
    def grad_norm(self):
        """Global gradient norm: my slices' sum of squares, counted on the first node only,
        wte once (the last stage leaves it out when pp > 1)."""
        st = self.stage
        skip_wte = st.spec.last and not st.spec.first
        sumsq = 0.0
        if self.cross.Get_rank() == 0:
            sumsq = sum(float(self.sum[lo:hi] @ self.sum[lo:hi])
                        for rs in self.ranges.values() for name, lo, hi, _ in rs
                        if not (name == "wte" and skip_wte))
        return float(np.sqrt(allreduce_sum(self.grid.world, [sumsq], self.grid.waiter)[0]))

    def step(self, t, lr, grad_scale=1.0):
        """Update my slices of the shared parameters, then publish them (node barrier)."""
        for lo, hi, adam in self.adams:
            adam.step(self.params[lo:hi], self.sum[lo:hi], t, lr, grad_scale)
        self._publish()

    def _publish(self):
        for b in self.bufs:
            b.sync()
        barrier(self.local, self.grid.waiter)
        for b in self.bufs:
            b.sync()

    def loaded(self):
        """The stage's parameters were just written (initialised, loaded or resumed) in its
        own buffer: local rank 0's become the shared copy every local uses from now on."""
        if self.li == 0:
            self.params[...] = self.stage.flat
        self._publish()
        self.stage.rebind(flat=self.params)

    def sync(self):
        """Nothing in flight after an update (the publishing barrier ended it)."""

    # -- checkpoints and reports ----------------------------------------------------------------
    def full_moments(self):
        return self.m, self.v

    def moment_buffers(self):
        """Stage-sized arrays a checkpoint's moments are read into (then set_moments)."""
        return np.empty_like(self.stage.flat), np.empty_like(self.stage.flat)

    def set_moments(self, m_full, v_full):
        """Local rank 0 writes them (loaded() publishes)."""
        if self.li == 0:
            self.m[...] = m_full
            self.v[...] = v_full

    @property
    def nbytes(self):
        """This rank's share of the node's Adam moments."""
        return 2 * self.m.nbytes // self.n

    @property
    def param_bytes(self):
        """This rank's share of the node's parameters."""
        return self.params.nbytes // self.n


def choose(grid, stage_size, itemsize, mode, zero=0, grad_reduce="auto", color=None):
    """(on, why) for --shared-dp `mode` (auto|on|off), agreed by every rank: on where two or
    more replicas of a stage share a node, every node holds as many of each stage, and
    /dev/shm has room; auto also leaves ZeRO-1 and an explicit --grad-reduce alone.
    Raises UserError when `on` cannot be honoured."""
    from mpigpt2.base.errors import UserError
    if mode == "off":
        return False, "--shared-dp off"
    if mode == "auto" and (zero or grad_reduce != "auto"):
        return False, "--zero 1" if zero else f"--grad-reduce {grad_reduce}"
    if grid.dp < 2:
        return False, NO_DATA_PARALLELISM
    with grid.waiter.bounded("the node-shared check (Comm_split, allgather)"):
        local = split_by_node(grid.data, color)
        n = local.Get_size()
        node = split_by_node(grid.world) if color is None else local
        # this node's total: every rank's share of its stage's windows (memory.state_bytes, as
        # every estimate of the run counts them)
        need = node.allreduce(state_bytes(stage_size, itemsize, grid.dp, 0, n))
        room = shm_room()
        fits = shm_fits(need, room)
        sizes = grid.world.allgather((n, fits))
        local.Free()
        if node is not local:
            node.Free()
    counts = sorted({c for c, _ in sizes})
    why = None
    if common_replicas(c for c, _ in sizes) == 1:  # (the rule every estimate of it uses)
        why = ("no two replicas of a stage share a node" if counts == [1] else
               f"nodes hold unequal numbers of a stage's replicas ({counts})")
    elif not all(f for _, f in sizes):
        why = (f"/dev/shm has no room for one copy per node (this node needs "
               f"{need / 2**20:.0f} MiB, {(room or 0) / 2**20:.0f} MiB free)")
    if why is None:
        return True, f"{counts[0]} replicas of a stage per node share one copy"
    if mode == "on" and counts != [1]:
        raise UserError(f"--shared-dp on: {why}")
    return False, why

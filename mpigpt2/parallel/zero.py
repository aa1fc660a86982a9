"""ZeRO-1: shard Adam state and the update, reduce gradients onto their owners, broadcast the
updated parameters back.

A stage's flat buffer is cut into parts, each sharded over a communicator: rank r of n owns
[r·N//n, (r+1)·N//n) of a part of N elements (sizes differ by at most one; no divisibility
needed). The tied wte of pp > 1 (held by the first and the last stage of every replica) is its
own part over the embed group (2·dp ranks), so its state is kept once, not on both stages; the
rest of the stage is a part over the data group. At pp = 1 the whole stage is one part over
the data group (wte included). Only the owner of a piece keeps Adam moments for it and updates
it; optimizer memory per rank is its stage's parameters ÷ dp, wte counted half on each stage.

Communication goes per contiguous tensor segment, bucketed by layer like the allreduce of
--zero 0, as one rooted reduce (and, after the update, one broadcast) per owner piece of the
segment: a segment usually lies in one shard, and MPICH's reduce-scatter / allgatherv are
pathologically slow (100x) for such one-sided counts, reduce and bcast are not. A layer's
reduce starts as soon as the last backward of the step finished it (wte's after the whole
backward), and the broadcast of a layer's updated parameters may complete during the next
step's forward, which waits only for the layer (or tensor) it is about to use.
(docs/design.md#gradient-reduction-and-zero-1)
"""

import numpy as np
from mpi4py import MPI

from mpigpt2.model.optim import AdamW
from mpigpt2.model.params import LAYER_NAMES


def shard_bounds(N, dp):
    return [(r * N // dp, (r + 1) * N // dp) for r in range(dp)]


def segment_split(a, b, bounds):
    """Per-rank (count, displacement within [a, b)) of segment [a, b) over the shards."""
    counts, displs = [], []
    for lo, hi in bounds:
        c = max(0, min(b, hi) - max(a, lo))
        counts.append(c)
        displs.append(max(a, lo) - a if c else 0)
    return counts, displs


def buckets(lay, nl):
    """The reduction buckets of a stage's flat buffer (ParamLayout lay, nl local layers):
    key -> [(tensor name, a, b)], key = a local layer index (its 12 tensors' rows) or the
    name of a tensor outside the layers (wte, wpe, lnfw, lnfb)."""
    out = {}
    for n in lay.shapes:
        off, size = lay.offsets[n], int(np.prod(lay.shapes[n]))
        if n in LAYER_NAMES:
            per = size // nl
            for i in range(nl):
                out.setdefault(i, []).append((n, off + i * per, off + (i + 1) * per))
        else:
            out.setdefault(n, []).append((n, off, off + size))
    return out


class Part:
    """Range [a, b) of the stage's flat buffer sharded over comm: the owners' bounds, and my
    shard's summed gradient and Adam moments."""

    def __init__(self, comm, a, b, dtype, hyper):
        self.comm, self.n, self.r = comm, comm.Get_size(), comm.Get_rank()
        self.a, self.b = a, b
        self.bounds = [(a + lo, a + hi) for lo, hi in shard_bounds(b - a, self.n)]
        self.lo, self.hi = self.bounds[self.r]
        self.gshard = np.zeros(self.hi - self.lo, dtype=dtype)
        self.adam = AdamW(self.hi - self.lo, dtype, *hyper)

    def pieces(self, a, b):
        """(owner rank, start, end) of the parts of segment [a, b) in each rank's shard."""
        counts, displs = segment_split(a, b, self.bounds)
        return [(r, a + d, a + d + c) for r, (c, d) in enumerate(zip(counts, displs)) if c]


class ShardedAdam:
    """The optimizer of --zero 1; also the gradient reducer the runtime calls (same interface
    as collectives.GradReducer: start_layer, start_rest, wait)."""

    def __init__(self, grid, stage, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.grid, self.stage = grid, stage
        hyper = (beta1, beta2, eps, weight_decay)
        lay, N = stage.layout, stage.layout.size
        self.mpitype = MPI.DOUBLE if stage.dtype == np.float64 else MPI.FLOAT
        tied = "wte" in lay.shapes and grid.pp > 1
        W = int(np.prod(lay.shapes["wte"])) if tied else 0
        assert not tied or lay.offsets["wte"] == 0, "wte leads the flat buffer (llm.c order)"
        self.parts = [Part(grid.data, W, N, stage.dtype, hyper)]
        if tied:
            self.parts.insert(0, Part(grid.embed, 0, W, stage.dtype, hyper))
        # segments: key -> [(part, a, b)]; key = local layer index, or the tensor name
        self.segments = {key: [(self.parts[0] if n == "wte" else self.parts[-1], a, b)
                               for n, a, b in segs]
                         for key, segs in buckets(lay, stage.nl).items()}
        self.red_reqs, self.started = [], set()
        self.gather_reqs = {}
        # the buffer itself (reading stage.grad_flat would zero the layers not written yet)
        self.grad = stage.grad_flat

    # -- gradients ------------------------------------------------------------------------------
    def _start(self, key):
        if key in self.started:
            return
        self.started.add(key)
        g = self.grad
        for part, a, b in self.segments[key]:
            for owner, x, y in part.pieces(a, b):
                mine = part.gshard[x - part.lo:y - part.lo] if owner == part.r else None
                if part.n == 1:
                    mine[...] = g[x:y]
                    continue
                self.red_reqs.append(part.comm.Ireduce(g[x:y], mine, op=MPI.SUM, root=owner))

    def start_layer(self, i):
        self._start(i)
        # progress the buckets in flight (no MPI thread)
        self.grid.waiter.checked(MPI.Request.Testall, self.red_reqs, "allreduce",
                                 lambda: "gradient reductions")

    def start_rest(self):
        """After the whole backward: the embeddings, lnf, and layers not started yet."""
        self.stage.finish_grads()
        for key in self.segments:
            self._start(key)

    def wait(self):
        self.grid.waiter.wait(self.red_reqs, "allreduce",
                              lambda: f"{len(self.red_reqs)} gradient reduces")
        self.red_reqs, self.started = [], set()

    def grad_sumsq(self):
        """Sum of squares of my shards' gradient; summed over the world it is the global
        gradient norm squared (the parts partition the model, wte included once)."""
        return sum(float(p.gshard @ p.gshard) for p in self.parts)

    # -- update and parameter broadcast ----------------------------------------------------------
    def step(self, t, lr, grad_scale=1.0, overlap=True):
        """Update my shards, then start the per-layer broadcasts of the updated parameters."""
        flat = self.stage.flat
        for p in self.parts:
            p.adam.step(flat[p.lo:p.hi], p.gshard, t, lr, grad_scale)
        for key, segs in self.segments.items():
            reqs = [part.comm.Ibcast(flat[x:y], root=owner) for part, a, b in segs
                    if part.n > 1 for owner, x, y in part.pieces(a, b)]
            if reqs:
                self.gather_reqs[key] = reqs
        if not overlap:
            self.sync()

    def wait_param(self, key):
        """Called before a layer (index) or tensor group ('wte', 'wpe', 'lnfw') is used."""
        reqs = self.gather_reqs.pop(key, None)
        if reqs:
            self.grid.waiter.wait(reqs, "allgather", lambda: f"parameter broadcast of {key}")
        for later in self.gather_reqs.values():  # progress the broadcasts of later layers
            self.grid.waiter.checked(MPI.Request.Testall, later, "allgather",
                                     lambda: "parameter broadcasts of later layers")

    def sync(self):
        for key in list(self.gather_reqs):
            self.wait_param(key)

    # -- checkpoints and checks -----------------------------------------------------------------
    def _assemble(self, shard_of, what):
        """Stage-sized array from every part's shards (collective over the parts' groups)."""
        full = np.empty(self.stage.layout.size, dtype=self.stage.dtype)
        reqs = []
        for p in self.parts:
            counts = [hi - lo for lo, hi in p.bounds]
            displs = [lo - p.a for lo, _ in p.bounds]
            reqs.append(p.comm.Iallgatherv(shard_of(p), [full[p.a:p.b], counts, displs,
                                                          self.mpitype]))
        self.grid.waiter.wait(reqs, "allgather", lambda: what)
        return full

    def full_moments(self):
        """Stage-sized Adam m and v assembled from the shards."""
        return [self._assemble(lambda p: p.adam.m, "Adam m gather"),
                self._assemble(lambda p: p.adam.v, "Adam v gather")]

    def full_grad(self):
        """The stage-sized summed gradient of the last step, assembled from the shards."""
        return self._assemble(lambda p: p.gshard, "gradient gather")

    def set_moments(self, m_full, v_full):
        for p in self.parts:
            p.adam.m[...] = m_full[p.lo:p.hi]
            p.adam.v[...] = v_full[p.lo:p.hi]

    @property
    def nbytes(self):
        return sum(p.adam.m.nbytes + p.adam.v.nbytes for p in self.parts)

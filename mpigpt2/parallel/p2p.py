"""Every point-to-point transfer of the pipeline: activation and gradient slices between stages.

Buffers are preallocated slabs (M, b·T, C), one per stage boundary, direction and role; slice j
of a micro-batch is the C-contiguous block of rows [b·start_j, b·(start_j + length_j)) (its b
sequences' tokens of that slice, in order), so each (micro-batch, slice) message has its own
block, uniform or not; a send block is written once per step and is not
touched again until its request completed (finish()). Tags encode (direction, boundary,
mb, slice).
(docs/design.md#schedules-as-data)
"""

import numpy as np
from mpi4py import MPI

from mpigpt2.parallel.schedule import FORWARD, BACKWARD, tag, max_tag
from mpigpt2.parallel.waiting import Waiter


class PipeP2P:
    """Sends and pre-posted receives of one rank's stages within its replica's pipe
    communicator; every stage boundary that crosses ranks has its own slabs and tags."""

    def __init__(self, pipe_comm, rank, pipe, b, lengths, C, dtype, waiter):
        self.waiter = waiter
        self.comm, self.rank, self.pipe = pipe_comm, rank, pipe
        if max_tag(pipe.P, pipe.M, pipe.n) > MPI.COMM_WORLD.Get_attr(MPI.TAG_UB):
            raise ValueError(f"stages × M × n = {pipe.P * pipe.M * pipe.n} messages per step "
                             f"exceed the MPI tag space")
        slab = (pipe.M, b * sum(lengths), C)
        starts = np.cumsum((0,) + tuple(lengths)).tolist()
        self.rows = [slice(b * starts[j], b * starts[j + 1]) for j in range(len(lengths))]
        self.buf = {}  # (kind, stage) -> (M, b*T, C)
        for s in pipe.stages(rank):
            if s > 0 and not pipe.local(s - 1, s):
                self.buf["RECV_F", s] = np.empty(slab, dtype)
                self.buf["SEND_B", s] = np.empty(slab, dtype)
            if s < pipe.P - 1 and not pipe.local(s, s + 1):
                self.buf["SEND_F", s] = np.empty(slab, dtype)
                self.buf["RECV_B", s] = np.empty(slab, dtype)
        self.recvs = {}
        self.sends, self.send_names = [], []  # requests in flight this step, and their names
        # world ranks of the neighbours, for the stall report
        near = sorted({pipe.placement[q] for s in pipe.stages(rank) for q in (s - 1, s + 1)
                       if 0 <= q < pipe.P} - {rank})
        groups = pipe_comm.Get_group(), MPI.COMM_WORLD.Get_group()
        self.world_rank = dict(zip(near, MPI.Group.Translate_ranks(groups[0], near, groups[1])))
        for g in groups:
            g.Free()

    def _peer_tag(self, kind, s, mb, j):
        """(peer pipe rank, tag, peer stage) of the message kind of stage s."""
        direction = FORWARD if kind.endswith("F") else BACKWARD
        q = s - 1 if kind in ("RECV_F", "SEND_B") else s + 1
        p = self.pipe
        return p.placement[q], tag(direction, min(q, s), mb, j, p.P, p.M, p.n), q

    def post_recv(self, kind, s, mb, j):
        peer, t, _ = self._peer_tag(kind, s, mb, j)
        self.recvs[(kind, s, mb, j)] = self.comm.Irecv(self.block(kind, s, mb, j),
                                                       source=peer, tag=t)

    def wait_recv(self, kind, s, mb, j):
        """Poll until the (mb, j) message of kind for stage s arrived; return its buffer
        (b*k, C)."""
        req = self.recvs.pop((kind, s, mb, j))
        peer, _, q = self._peer_tag(kind, s, mb, j)
        what = "activations" if kind == "RECV_F" else "gradients"
        self.waiter.wait([req], "p2p", lambda: f"{kind} stage={s} mb={mb} slice={j} ({what} "
                                       f"from stage {q}, rank {self.world_rank[peer]})")
        return self.block(kind, s, mb, j)

    def block(self, kind, s, mb, j):
        """The (b*length_j, C) block of slice j of micro-batch mb (a contiguous view)."""
        return self.buf[kind, s][mb, self.rows[j]]

    def send(self, kind, s, mb, j, data):
        """Copy data (b*k, C) into its send block and start the Isend."""
        block = self.block(kind, s, mb, j)
        block[...] = data
        peer, t, _ = self._peer_tag(kind, s, mb, j)
        self.sends.append(self.comm.Isend(block, dest=peer, tag=t))
        self.send_names.append(f"{s}{kind}{mb}.{j}")

    def sends_done(self):
        """Names of the sends that completed since the last call (tracing only: a Testsome)."""
        idx = self.waiter.checked(MPI.Request.Testsome, self.sends, "p2p",
                                  lambda: f"{len(self.sends)} sends to finish") or []
        done = [self.send_names[i] for i in idx if self.send_names[i] is not None]
        for i in idx:
            self.send_names[i] = None
        return done

    def finish(self):
        """Wait for every send of the step (receives were consumed by wait_recv); returns
        the names of the sends that were still in flight."""
        assert not self.recvs, f"unconsumed receives: {sorted(self.recvs)}"
        self.waiter.wait(self.sends, "p2p", lambda: f"{len(self.sends)} sends to finish")
        late = [n for n in self.send_names if n is not None]
        self.sends, self.send_names = [], []
        return late


PROBE_TAG = 7  # set-up only: no pipeline message is in flight yet


def _spin(reqs, deadline, what):
    """Busy-poll reqs (a latency probe must not sleep between polls) until the deadline; an
    MPI error is reported as Waiter.checked reports it (caught around the loop: no cost per
    poll)."""
    import time
    try:
        while not MPI.Request.Testall(reqs):
            if time.perf_counter() > deadline:
                raise TimeoutError(what)
    except MPI.Exception as e:
        Waiter().mpi_error(e, "setup", lambda: what)


def pingpong(comm, peer, first, nbytes, reps, seconds=10.0):
    """Best one-way time (s) of nbytes between this rank and peer over reps round trips;
    `first` sends first, the peer echoes. Bounded: TimeoutError after `seconds`
    (docs/design.md#the-network-model)."""
    import time
    buf = np.zeros(max(1, nbytes), np.uint8)
    deadline, best = time.perf_counter() + seconds, float("inf")
    what = f"the network probe with rank {peer}"
    for _ in range(reps + 1):  # (the first round trip connects)
        t0 = time.perf_counter()
        if first:
            _spin([comm.Isend(buf, peer, PROBE_TAG)], deadline, what)
            _spin([comm.Irecv(buf, peer, PROBE_TAG)], deadline, what)
        else:
            _spin([comm.Irecv(buf, peer, PROBE_TAG)], deadline, what)
            _spin([comm.Isend(buf, peer, PROBE_TAG)], deadline, what)
        best = min(best, (time.perf_counter() - t0) / 2)
    return best

"""Every point-to-point transfer of the pipeline: activation and gradient slices between stages.

Buffers are preallocated slabs (M, n, b·k, C), one per direction and role, so each (micro-batch,
slice) message has its own C-contiguous block; a send block is written once per step and is not
touched again until its request completed (finish()). Tags encode (direction, mb, slice).
(docs/design.md#schedules-as-data)
"""

import numpy as np
from mpi4py import MPI

from mpigpt2.parallel.schedule import FORWARD, BACKWARD, tag, max_tag


class PipeP2P:
    """Sends and pre-posted receives of one stage within its replica's pipe communicator."""

    def __init__(self, pipe, stage, pp, M, n, rows, C, dtype, waiter):
        self.waiter = waiter
        self.comm, self.stage, self.pp, self.M, self.n = pipe, stage, pp, M, n
        if max_tag(M, n) > MPI.COMM_WORLD.Get_attr(MPI.TAG_UB):
            raise ValueError(f"M·n = {M * n} slices per step exceed the MPI tag space")
        slab = (M, n, rows, C)
        has_prev, has_next = stage > 0, stage < pp - 1
        self.buf = {
            "RECV_F": np.empty(slab, dtype) if has_prev else None,  # (M, n, b*k, C)
            "SEND_F": np.empty(slab, dtype) if has_next else None,
            "RECV_B": np.empty(slab, dtype) if has_next else None,
            "SEND_B": np.empty(slab, dtype) if has_prev else None,
        }
        self.recvs = {}
        self.sends, self.send_names = [], []  # requests in flight this step, and their names
        # world ranks of the neighbours, for the stall report
        near = [s for s in (stage - 1, stage + 1) if 0 <= s < pp]
        groups = pipe.Get_group(), MPI.COMM_WORLD.Get_group()
        self.world_rank = dict(zip(near, MPI.Group.Translate_ranks(groups[0], near, groups[1])))
        for g in groups:
            g.Free()

    def _peer_tag(self, kind, mb, j):
        direction = FORWARD if kind.endswith("F") else BACKWARD
        if kind in ("RECV_F", "SEND_B"):
            peer = self.stage - 1
        else:
            peer = self.stage + 1
        return peer, tag(direction, mb, j, self.M, self.n)

    def post_recv(self, kind, mb, j):
        peer, t = self._peer_tag(kind, mb, j)
        self.recvs[(kind, mb, j)] = self.comm.Irecv(self.buf[kind][mb, j], source=peer, tag=t)

    def wait_recv(self, kind, mb, j):
        """Poll until the (mb, j) message of kind arrived; return its buffer (b*k, C)."""
        req = self.recvs.pop((kind, mb, j))
        peer, _ = self._peer_tag(kind, mb, j)
        what = "activations" if kind == "RECV_F" else "gradients"
        self.waiter.wait([req], "p2p", lambda: f"{kind} mb={mb} slice={j} ({what} from stage {peer}, "
                                       f"rank {self.world_rank[peer]})")
        return self.buf[kind][mb, j]

    def send(self, kind, mb, j, data):
        """Copy data (b*k, C) into its send block and start the Isend."""
        block = self.buf[kind][mb, j]
        block[...] = data
        peer, t = self._peer_tag(kind, mb, j)
        self.sends.append(self.comm.Isend(block, dest=peer, tag=t))
        self.send_names.append(f"{kind}{mb}.{j}")

    def sends_done(self):
        """Names of the sends that completed since the last call (tracing only: a Testsome)."""
        idx = MPI.Request.Testsome(self.sends) or []
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

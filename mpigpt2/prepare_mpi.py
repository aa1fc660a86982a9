"""prepare under mpiexec: rank r encodes blocks k ≡ r (mod ranks) and sends them to rank 0, which
writes them in block order (its own blocks it encodes itself). (docs/design.md#preparing-corpora)"""

import numpy as np
from mpi4py import MPI

from mpigpt2.base.watchdog import init_done
from mpigpt2.formats.blocks import Encoded
from mpigpt2.parallel.failure import agree, install_excepthook
from mpigpt2.parallel.waiting import Waiter
from mpigpt2.prepare_run import report, setup, write_all
from mpigpt2.prepare_workers import produce

TAG = 16
KINDS = ("ok", "err", "end")


def send_item(comm, item, waiter):
    """One result to rank 0: an int64 header, then tokens and text as one uint8 message."""
    kind, k = item[0], item[1]
    enc = item[2] if kind == "ok" else Encoded(np.zeros(0, np.uint16))
    text = (item[2] if kind == "err" else enc.first_bad).encode("utf-8")
    raw_end = item[3] if kind == "ok" else (item[2] if kind == "end" else 0)
    if kind == "end":
        text = b""
    head = np.array([KINDS.index(kind), k, len(enc.tokens), raw_end, enc.docs, enc.bad,
                     len(text)], dtype=np.int64)
    body = np.frombuffer(enc.tokens.astype("<u2").tobytes() + text, dtype=np.uint8).copy()
    reqs = [comm.Isend(head, 0, TAG)]
    if len(body):
        reqs.append(comm.Isend(body, 0, TAG))
    waiter.wait(reqs, "p2p", lambda: f"rank 0 to take block {k}")


def recv_item(comm, src, waiter):
    """The next result rank src sent (the inverse of send_item)."""
    head = np.zeros(7, dtype=np.int64)
    waiter.wait([comm.Irecv(head, src, TAG)], "p2p", lambda: f"a block from rank {src}")
    kind, k, ntok, raw_end, docs, bad, ntext = (int(x) for x in head)
    body = np.zeros(2 * ntok + ntext, dtype=np.uint8)
    if len(body):
        waiter.wait([comm.Irecv(body, src, TAG)], "p2p", lambda: f"block {k} from rank {src}")
    text = body[2 * ntok:].tobytes().decode("utf-8")
    kind = KINDS[kind]
    if kind == "err":
        return ("err", k, text)
    if kind == "end":
        return ("end", k, raw_end)
    toks = body[:2 * ntok].view("<u2").astype(np.uint16)
    return ("ok", k, Encoded(toks, docs, bad, text), raw_end)


class MpiSource:
    """Rank 0's view: block k from rank k mod size (or from itself)."""

    def __init__(self, spec, comm, start, waiter):
        self.comm, self.n, self.waiter = comm, comm.Get_size(), waiter
        self.own = produce(spec, 0, self.n, start)
        self.ended = {0}

    def get(self, k):
        r = k % self.n
        if r == 0:
            return next(self.own)
        item = recv_item(self.comm, r, self.waiter)
        if item[0] == "end":
            self.ended.add(r)
        return item

    def close(self):
        """After a complete run: take the 'end' every other rank still has on its way."""
        for r in range(self.n):
            if r not in self.ended:
                recv_item(self.comm, r, self.waiter)
                self.ended.add(r)
        self.own.close()


def serve(spec, comm, start, waiter):
    """Ranks other than 0: encode our blocks and send them, then 'end' (or the first error)."""
    for item in produce(spec, comm.Get_rank(), comm.Get_size(), start):
        send_item(comm, item, waiter)
        if item[0] != "ok":
            return


def run_mpi(spec, out_dir, options, quiet):
    """Rank 0 sets up (or resumes) and writes; every rank encodes its share of the blocks."""
    init_done()  # MPI_Init has returned (this module's import): the sentinel now watches
    comm, waiter = MPI.COMM_WORLD, Waiter()
    install_excepthook(comm)
    rank = comm.Get_rank()
    plan = agree(comm, lambda: setup(out_dir, spec, options) if rank == 0 else None,
                 waiter=waiter)
    if rank == 0:
        m, made_dir = plan
        start = -1 if m.get("complete") else (m["shards"][-1]["next_block"] if m["shards"]
                                              else 0)
    with waiter.bounded("the resume point (bcast)"):  # set-up metadata: pickle is fine
        start = comm.bcast(start if rank == 0 else None, root=0)
    counts = []
    if start < 0:
        if rank == 0:
            print(f"{out_dir}: already complete ({len(m['shards'])} shards verified)")
            counts = [s["tokens"] for s in m["shards"]]
    elif rank == 0:
        source = MpiSource(spec, comm, start, waiter)
        stream = write_all(out_dir, m, made_dir, source, quiet)
        source.close()
        report(out_dir, stream)
        counts = [s["tokens"] for s in stream.m["shards"]]
    else:
        serve(spec, comm, start, waiter)
    waiter.wait([comm.Ibarrier()], "setup", lambda: "the other ranks to finish prepare")
    return counts

"""Who encodes which block for prepare: this process, or a pool of processes; the writer asks
for the results strictly in block order, so the output never depends on the worker count.
(docs/design.md#preparing-corpora)"""

import multiprocessing
import os
import queue
import signal
import time

from mpigpt2.base.errors import UserError
from mpigpt2.formats.blocks import encode_block, iter_blocks
from mpigpt2.formats.tokenizer import gpt2_encoding

QUEUE_DEPTH = 4  # finished blocks a worker may hold ahead of the writer: bounds the memory
POLL_SECONDS = 0.2
STALL_SECONDS = 1800.0  # no block for this long from a live worker: give up, never hang
JOIN_SECONDS = 5.0


def produce(spec, w, n, start):
    """The results of worker w of n, in order, from block `start` on: ('ok', k, Encoded,
    raw_end) for each of its blocks (k ≡ w mod n), then ('end', K, raw_end) with K the number
    of blocks, or ('err', k, message) at the first bad block k (every worker sees a stream
    error at the same k; a bad document only its owner)."""
    enc = gpt2_encoding()
    nxt, raw_end = 0, 0
    try:
        for b in iter_blocks(spec):
            nxt, raw_end = b.index + 1, b.raw_end
            if b.index < start or b.index % n != w:
                continue
            try:
                yield ("ok", b.index, encode_block(b, spec, enc), b.raw_end)
            except UserError as e:
                yield ("err", b.index, str(e))
                return
    except UserError as e:
        yield ("err", nxt, str(e))
        return
    yield ("end", nxt, raw_end)


class InlineSource:
    """--workers 1: the writer encodes every block itself."""

    def __init__(self, spec, start):
        self.gen = produce(spec, 0, 1, start)

    def get(self, k):
        return next(self.gen)

    def close(self):
        self.gen.close()


def _pool_worker(spec, w, n, start, q, parent):
    """A worker process: its results into its bounded queue; stops if the writer is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the writer, which ends us
    for item in produce(spec, w, n, start):
        while True:
            try:
                q.put(item, timeout=POLL_SECONDS)
                break
            except queue.Full:
                if os.getppid() != parent:  # the writer was killed: nobody will read this
                    return
        if item[0] != "ok":
            return


class PoolSource:
    """--workers N > 1: N spawned processes; block k comes from worker k mod N's queue."""

    def __init__(self, spec, n, start):
        ctx = multiprocessing.get_context("spawn")  # no fork: safe next to threads and MPI
        self.n = n
        self.queues = [ctx.Queue(QUEUE_DEPTH) for _ in range(n)]
        self.procs = [ctx.Process(target=_pool_worker, daemon=True,
                                  args=(spec, w, n, start, self.queues[w], os.getpid()))
                      for w in range(n)]
        for p in self.procs:
            p.start()

    def get(self, k):
        w = k % self.n
        t0 = time.monotonic()
        while True:
            try:
                return self.queues[w].get(timeout=POLL_SECONDS)
            except queue.Empty:
                pass
            p = self.procs[w]
            if not p.is_alive():
                try:  # it may have put its last item just before exiting
                    return self.queues[w].get(timeout=POLL_SECONDS)
                except queue.Empty:
                    raise RuntimeError(f"prepare worker {w} died (exit code {p.exitcode}) "
                                       f"before block {k}") from None
            if time.monotonic() - t0 > STALL_SECONDS:
                raise RuntimeError(f"prepare worker {w} gave no block {k} for "
                                   f"{STALL_SECONDS:.0f} s")

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(JOIN_SECONDS)
            if p.is_alive():
                p.kill()
                p.join(JOIN_SECONDS)
        for q in self.queues:
            q.cancel_join_thread()
            q.close()

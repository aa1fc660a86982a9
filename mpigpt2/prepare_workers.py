"""Who encodes which block for prepare: this process, or a pool of processes; the writer asks
for the results strictly in block order, so the output never depends on the worker count.
(docs/design.md#preparing-corpora)"""

import multiprocessing
import os
import queue
import signal
import threading
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


def _send_all(items, conn, parent):
    """Send items through conn from a thread, QUEUE_DEPTH ahead at most. A pipe has no feeder
    thread to wait for at exit; if the writer dies its end closes and send() fails."""
    box = queue.Queue(QUEUE_DEPTH)
    failed = threading.Event()

    def sender():
        while (item := box.get()) is not None:
            try:
                conn.send(item)
            except OSError:  # BrokenPipeError: the writer is gone
                failed.set()
                return

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    for item in items:
        while not failed.is_set():
            try:
                box.put(item, timeout=POLL_SECONDS)
                break
            except queue.Full:
                if os.getppid() != parent:
                    failed.set()
        if failed.is_set() or item[0] != "ok":
            break
    while not failed.is_set() and t.is_alive():
        try:
            box.put(None, timeout=POLL_SECONDS)
            break
        except queue.Full:
            failed.set() if os.getppid() != parent else None
    while t.is_alive() and not failed.is_set() and os.getppid() == parent:
        t.join(POLL_SECONDS)


def _pool_worker(spec, w, n, start, conn, parent):
    """A worker process: its results, in order, to the writer through conn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the writer, which ends us
    _send_all(produce(spec, w, n, start), conn, parent)


class PoolSource:
    """--workers N > 1: N spawned processes; block k comes from worker k mod N."""

    def __init__(self, spec, n, start):
        ctx = multiprocessing.get_context("spawn")  # no fork: safe next to threads and MPI
        self.n, self.conns, self.procs = n, [], []
        for w in range(n):
            r, s = ctx.Pipe(duplex=False)
            self.procs.append(ctx.Process(target=_pool_worker, daemon=True,
                                          args=(spec, w, n, start, s, os.getpid())))
            self.procs[-1].start()
            s.close()  # only the worker holds the sending end: its sends fail if we die
            self.conns.append(r)

    def get(self, k):
        w = k % self.n
        conn, p = self.conns[w], self.procs[w]
        t0 = time.monotonic()
        while not conn.poll(POLL_SECONDS):
            if not p.is_alive() and not conn.poll(POLL_SECONDS):
                raise RuntimeError(f"prepare worker {w} died (exit code {p.exitcode}) "
                                   f"before block {k}")
            if time.monotonic() - t0 > STALL_SECONDS:
                raise RuntimeError(f"prepare worker {w} gave no block {k} for "
                                   f"{STALL_SECONDS:.0f} s")
        try:
            return conn.recv()
        except EOFError:
            raise RuntimeError(f"prepare worker {w} closed its pipe before block {k} "
                               f"(exit code {p.exitcode})") from None

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(JOIN_SECONDS)
            if p.is_alive():
                p.kill()
                p.join(JOIN_SECONDS)
        for c in self.conns:
            c.close()

"""prepare for corpora: set up (or resume) an output directory, then write the blocks' tokens in
order into shards, with any number of workers or MPI ranks. (docs/design.md#preparing-corpora)"""

import contextlib
import os
import signal
import sys
import time

from mpigpt2.base.errors import UserError
from mpigpt2.formats import manifest as mf
from mpigpt2.formats.blocks import CHUNK_BYTES, CorpusSpec, require_pyarrow
from mpigpt2.formats.corpus import describe_inputs, expand_inputs
from mpigpt2.formats.shardstream import (ShardStream, discard, foreign_shards, remove_temps)
from mpigpt2.prepare_workers import InlineSource, PoolSource

PROGRESS_BYTES = 8 << 20  # show a progress bar above this much input
SMALL_INPUT = 4 << 20  # below this, starting worker processes costs more than it saves
MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def mpi_size_from_env():
    """Ranks of the MPI job this process belongs to (1 when not under mpiexec/srun)."""
    for var in MPI_SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _verified(out_dir, old):
    """old's shards up to the first one missing or changed; the later ones are removed."""
    good = []
    for s in old["shards"]:
        if not mf.shard_ok(out_dir, s):
            break
        good.append(s)
    for s in old["shards"][len(good):]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, s["name"]))
    return good


def setup(out_dir, spec, options):
    """(manifest to continue, made_dir): a fresh run's, or the verified one of an interrupted
    run with the same inputs and options. UserError if out_dir belongs to another run."""
    if spec.kind == "parquet":
        require_pyarrow()
    fresh = mf.new(describe_inputs(spec.paths), options)
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    old = mf.read(out_dir)
    if old is None:
        if foreign_shards(out_dir):
            raise UserError(f"--out-dir {out_dir} already holds token shards "
                            f"({os.path.basename(foreign_shards(out_dir)[0])}, …) but no "
                            f"{mf.NAME}: another run's — use another --out-dir or remove them")
        remove_temps(out_dir)
        mf.write(out_dir, fresh)  # before any shard: a shard is never without its manifest
        return fresh, made_dir
    why = mf.difference(old, fresh)
    if why:
        raise UserError(f"--out-dir {out_dir} holds the shards of another prepare run ({why}); "
                        "use another --out-dir, or delete it to start over")
    remove_temps(out_dir)
    good = _verified(out_dir, old)
    if len(good) < len(old["shards"]) or not old.get("complete"):
        old.update(shards=good, complete=False, totals={})
        mf.write(out_dir, old)
    old["inputs"] = fresh["inputs"]  # same contents; the paths may have moved
    return old, made_dir


class _Progress:
    """tqdm over the corpus bytes on disk (bytes/s, ETA), with tokens/s beside it."""

    def __init__(self, total, quiet):
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
                        disable=quiet or total < PROGRESS_BYTES, smoothing=0.1)
        self.done, self.tokens, self.t0 = 0, 0, time.perf_counter()

    def update(self, raw_end, ntok):
        self.tokens += ntok
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e6:.2f}M tok/s", refresh=False)
        self.bar.update(max(0, raw_end - self.done))
        self.done = max(self.done, raw_end)

    def close(self):
        self.bar.close()


def _check_result(stream, options):
    """Refuse a corpus with no text, or with nothing left for training after val."""
    c = stream.counts
    if stream.tokens() <= c["docs"]:
        raise UserError(f"the inputs hold no text ({c['docs']} documents, all empty"
                        f"{', ' + str(c['bad']) + ' bad lines skipped' if c['bad'] else ''}): "
                        "an empty corpus — check the inputs and --field")
    if all(s["split"] == "val" for s in stream.m["shards"]):
        val = (f"--val-tokens {options['val_tokens']}" if options["val_tokens"]
               else f"--val-shards {options['val_shards']}")
        raise UserError(f"the inputs give only {stream.tokens()} tokens, none left for "
                        f"training after {val}; lower it or add text")


def write_all(out_dir, m, made_dir, source, quiet):
    """Take block results in order into the shards. Bad input removes everything this run
    wrote (it could never finish); an interrupt keeps the published shards for a resume."""
    stream = ShardStream(out_dir, m)
    bar = _Progress(sum(i["size"] for i in m["inputs"]), quiet)
    k = stream.resume_block
    try:
        while (item := source.get(k))[0] != "end":
            if item[0] == "err":
                raise UserError(item[2])
            stream.put(k, item[2])
            bar.update(item[3], len(item[2].tokens))
            k += 1
        stream.finish()
        _check_result(stream, m["options"])
    except UserError:
        stream.abort()
        discard(out_dir, m)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    finally:
        stream.abort()
        bar.close()
    return stream


def report(out_dir, stream):
    t = stream.m["totals"]
    c = stream.counts
    skipped = (f"; skipped {c['bad']} bad lines (first: {c['first_bad']})" if c["bad"] else "")
    print(f"wrote {t['tokens']:,} tokens from {t['documents']:,} documents in {t['shards']} "
          f"shards to {out_dir} ({mf.NAME} lists them){skipped}")


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the run like Ctrl-C: the open temp shard is dropped, workers stopped."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def prepare_corpus(kind, items, out_dir, *, field="text", prefix=None, shard_tokens=10**8,
                   val_tokens=32768, val_shards=0, workers=None, skip_bad=False,
                   chunk_bytes=CHUNK_BYTES, quiet=False):
    """Tokenize a corpus into llm.c shards in out_dir (resuming an interrupted run); returns
    the shards' token counts in order. Under mpiexec every rank takes part."""
    if val_tokens and val_shards:
        raise UserError("give --val-tokens or --val-shards, not both (--val-tokens 0 "
                        "--val-shards 1 makes the whole first shard val, as llm.c does)")
    spec = CorpusSpec(kind, tuple(expand_inputs(items, kind)), field, chunk_bytes, skip_bad)
    options = {"kind": kind, "field": field if kind != "text" else None,
               "prefix": prefix or kind, "shard_tokens": shard_tokens,
               "val_tokens": val_tokens, "val_shards": val_shards, "chunk_bytes": chunk_bytes,
               "skip_bad": skip_bad}
    if mpi_size_from_env() > 1:
        if workers not in (None, 1):
            raise UserError("under mpiexec every rank is one worker: drop --workers (or run "
                            "without mpiexec)")
        if "mpi4py.MPI" not in sys.modules:
            # MPI_Init comes with the next import: start each rank's sentinel first, as the
            # trainer does (base/watchdog.py, docs/design.md#waiting)
            from mpigpt2.base.watchdog import guard_init
            guard_init([])
        from mpigpt2.prepare_mpi import run_mpi
        return run_mpi(spec, out_dir, options, quiet)
    if workers is None:
        small = sum(os.path.getsize(p) for p in spec.paths) < SMALL_INPUT
        workers = 1 if small else len(os.sched_getaffinity(0))
    m, made_dir = setup(out_dir, spec, options)
    if m.get("complete"):
        print(f"{out_dir}: already complete ({len(m['shards'])} shards verified)")
        return [s["tokens"] for s in m["shards"]]
    start = m["shards"][-1]["next_block"] if m["shards"] else 0
    with _sigterm_as_interrupt():
        source = InlineSource(spec, start) if workers == 1 else PoolSource(spec, workers, start)
        try:
            stream = write_all(out_dir, m, made_dir, source, quiet)
        finally:
            source.close()
    report(out_dir, stream)
    return [s["tokens"] for s in stream.m["shards"]]

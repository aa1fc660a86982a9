"""llm.c token shards: a 256×int32 header then uint16 tokens; atomic writes, strict reads."""

import contextlib
import glob
import os

import numpy as np

from mpigpt2.base.errors import UserError
from mpigpt2.base.files import open_regular
from mpigpt2.formats.atomic import AtomicFile, owned

MAGIC = 20240520  # llm.c's GPT-2 (uint16) token shard
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKEN = 2**16 - 1
_HINT = "re-run `python -m mpigpt2.prepare`"


class ShardWriter:
    """Streams tokens into a temp file beside `path`; finish() seals it, commit() renames it.

    Splitting sealing from renaming lets a caller write several shards and publish them only
    once all succeeded; abort() (or an exception inside `with`) leaves nothing behind.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self.out = AtomicFile(self.path)
        except OSError as e:
            raise UserError(f"cannot create {self.path} ({e.strerror}) — does its directory "
                            "exist and is it writable?") from None
        try:
            self.f = self.out.f
            self.f.write(b"\0" * HEADER_BYTES)  # real header once the count is known
        except BaseException:
            self.out.abort()
            raise
        self.count = 0
        self.done = False

    def write(self, tokens):
        """Append tokens (any integer array-like); refuses ids outside [0, 65535]."""
        toks = np.asarray(tokens)
        if toks.size == 0:
            return
        if not np.issubdtype(toks.dtype, np.integer):
            raise UserError(f"{self.path}: token ids must be integers, got dtype {toks.dtype}")
        lo, hi = int(toks.min()), int(toks.max())
        if lo < 0 or hi > MAX_TOKEN:
            raise UserError(f"{self.path}: token id {lo if lo < 0 else hi} does not fit the "
                            f"uint16 llm.c shard format (0..{MAX_TOKEN})")
        if self.count + toks.size >= 2**31:
            raise UserError(f"{self.path}: more than 2**31-1 tokens in one shard; "
                            "use a smaller --shard-tokens")
        self.f.write(toks.astype("<u2", copy=False).ravel().tobytes())
        self.count += toks.size

    def finish(self):
        """Write the header and fsync; the file is complete but still under its temp name."""
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[:3] = (MAGIC, VERSION, self.count)
        self.f.seek(0)
        self.f.write(header.tobytes())
        self.out.seal()
        self.done = True

    def commit(self):
        """Atomically move the finished file to its final path."""
        if not self.done:
            self.finish()
        self.out.commit()

    def abort(self):
        """Drop the temp file (safe to call more than once)."""
        self.out.abort()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_shard(path, tokens):
    """Write tokens to `path` as one llm.c shard, atomically (temp file + fsync + rename)."""
    with contextlib.ExitStack() as stack:
        w = owned(stack, lambda: ShardWriter(path))
        w.write(tokens)
    return w.count


def read_shard(path, vocab_size=None):
    """Validate an llm.c shard and return its tokens as a read-only uint16 memmap."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"token shard {path} does not exist — check the path or {_HINT}")
    f = open_regular(path, "token shard")  # a FIFO or device is refused, never opened blocking
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_BYTES)
        except OSError as e:
            raise UserError(f"cannot read token shard {path} ({e.strerror})") from None
        tokens = _tokens(f, path, raw, size)
    if vocab_size is not None and len(tokens):
        top = int(tokens.max())
        if top >= vocab_size:
            raise UserError(f"{path}: token id {top} is outside the model's vocab size "
                            f"{vocab_size} — made with another tokenizer? {_HINT}")
    return tokens


def _tokens(f, path, raw, size):
    """The tokens of the open shard f after checking its header against its size."""
    if size < HEADER_BYTES:
        raise UserError(f"{path}: only {size} bytes, shorter than the {HEADER_BYTES}-byte "
                        f"llm.c header — {_HINT}")
    magic, version, count = (int(x) for x in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise UserError(f"{path}: not an llm.c token shard (magic {magic}) — {_HINT}")
    if version != VERSION:
        raise UserError(f"{path}: llm.c shard version {version}, expected {VERSION} — {_HINT}")
    want = HEADER_BYTES + 2 * count
    if count < 0:
        raise UserError(f"{path}: the header's token count is {count}, negative: a damaged or "
                        f"foreign file — {_HINT}")
    if size < want:
        raise UserError(f"{path}: truncated: header says {count} tokens ({want} bytes) but the "
                        f"file has {size} bytes — {_HINT}")
    if size > want:
        raise UserError(f"{path}: {size - want} trailing bytes after the {count} tokens the "
                        f"header announces — {_HINT}")
    if count == 0:
        return np.zeros(0, dtype=np.uint16)  # mmap refuses empty regions
    try:  # mapped through the descriptor that was checked
        return np.memmap(f, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot map token shard {path} ({e}); did it change while being "
                        f"read?") from None


def shard_paths(pattern, flag="--train-data"):
    """Sorted shard files matching a glob; UserError naming `flag` when nothing matches."""
    paths = sorted(glob.glob(os.path.expanduser(os.fspath(pattern))))
    # directories a glob matches are skipped; anything else (a FIFO, a dangling symlink) is
    # kept, so that read_shard names it instead of "matches no files"
    paths = [p for p in paths if not os.path.isdir(p)]
    if not paths:
        raise UserError(f"{flag} {pattern!s} matches no files — run `python -m mpigpt2.prepare` "
                        f"or fix the path/glob")
    return paths

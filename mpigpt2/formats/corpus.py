"""Corpus inputs for prepare: naming the files, opening them (gzip/zstd/xz by magic bytes), hashing.
(docs/design.md#preparing-corpora)"""

import glob
import gzip
import hashlib
import lzma
import os
import zlib

from mpigpt2.base.errors import UserError

# Compression is recognised by the first bytes, never by the name: a plain text file cannot
# start with these (0x8b, 0xb5 and 0xfd are not UTF-8 lead bytes).
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz"}
HASH_BLOCK = 1 << 20
SUFFIXES = {"text": (".txt",), "jsonl": (".jsonl", ".json", ".ndjson"), "parquet": (".parquet",)}
COMPRESSED_SUFFIXES = ("", ".gz", ".zst", ".zstd", ".xz")


def _in_directory(d, kind):
    """Files of this kind directly or deeper under d, sorted by path (the input order)."""
    ends = tuple(s + c for s in SUFFIXES[kind] for c in COMPRESSED_SUFFIXES)
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        found += [os.path.join(root, f) for f in files  # (not a prepare output's manifest)
                  if f.endswith(ends) and not f.startswith(".") and f != "manifest.json"]
    return sorted(found)


def expand_inputs(items, kind):
    """Files, directories (their *.txt / *.jsonl / *.parquet files, maybe compressed, sorted) and
    globs (sorted) in the order given; UserError if one names nothing or a file repeats."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = _in_directory(item, kind)
            what = (f"input {item} is a directory with no {'/'.join(SUFFIXES[kind])}"
                    "[.gz|.zst|.xz] files")
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if not os.path.isdir(p))
            what = f"{item} matches no files"
        else:
            found, what = [item], ""
        if not found:
            raise UserError(f"{what}; check the path")
        paths += found
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"input {p}: no such file")
        if not os.path.isfile(p):
            raise UserError(f"input {p} is not a regular file")
    seen = set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise UserError(f"input {p} is given twice; each file may appear once")
        seen.add(real)
    return paths


def describe_inputs(paths):
    """[{path, size, sha256}] for the manifest: content decides whether a run may resume."""
    out = []
    for p in paths:
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                while b := f.read(HASH_BLOCK):
                    h.update(b)
        except OSError as e:
            raise UserError(f"input {p}: cannot read ({e.strerror})") from None
        out.append({"path": os.path.abspath(p), "size": os.path.getsize(p),
                    "sha256": h.hexdigest()})
    return out


def compression_of(path):
    """'gzip', 'zstd', 'xz' or None, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return None


class _ZstdFrames:
    """Decompresses concatenated zstd frames; a stream that ends inside a frame is an error
    (zstandard's stream_reader returns a short read there without complaint)."""

    def __init__(self, raw):
        import zstandard
        self.raw, self.new = raw, zstandard.ZstdDecompressor().decompressobj
        self.dobj, self.fed, self.pending = self.new(), False, b""

    def read(self, n):
        while len(self.pending) < n:
            chunk = self.raw.read(HASH_BLOCK)
            if not chunk:
                if self.fed and not self.dobj.eof:
                    raise EOFError("the stream ends inside a zstd frame")
                break
            while chunk:
                if self.dobj.eof:
                    self.dobj, self.fed = self.new(), False
                self.pending += self.dobj.decompress(chunk)
                self.fed = True
                chunk = self.dobj.unused_data if self.dobj.eof else b""
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def close(self):
        pass


class Opened:
    """One input as a stream of (decompressed) bytes; .raw_pos is how far the file on disk has
    been read (the progress bar's unit). Read errors become one-line UserErrors."""

    def __init__(self, path):
        self.path = path
        try:
            self.raw = open(path, "rb")
        except OSError as e:
            raise UserError(f"input {path}: cannot read ({e.strerror})") from None
        self.kind = compression_of(path)
        if self.kind == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif self.kind == "xz":
            self.stream = lzma.LZMAFile(self.raw, mode="rb")
        elif self.kind == "zstd":
            self.stream = _ZstdFrames(self.raw)
        else:
            self.stream = self.raw

    @property
    def raw_pos(self):
        return self.raw.tell()

    def read(self, n):
        try:
            data = self.stream.read(n)
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            what = f"{self.kind} data" if self.kind else "data"
            raise UserError(f"input {self.path}: truncated or corrupt {what} ({e}) — "
                            "re-download or recompress it") from None
        except Exception as e:  # zstandard.ZstdError is not an OSError
            if type(e).__name__ != "ZstdError":
                raise
            raise UserError(f"input {self.path}: truncated or corrupt zstd data ({e}) — "
                            "re-download or recompress it") from None
        return data

    def close(self):
        if self.stream is not self.raw:
            self.stream.close()
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

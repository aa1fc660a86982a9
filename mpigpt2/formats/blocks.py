"""A corpus cut into numbered blocks and each block turned into tokens (llm.c's fineweb convention).

Every worker cuts the inputs into the same blocks (cheap: read, decompress, find a cut) and
encodes only its own, so the numbering, hence the output, never depends on the worker count.
(docs/design.md#preparing-corpora)
"""

import codecs
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from mpigpt2.base.errors import UserError
from mpigpt2.formats.corpus import Opened, compression_of
from mpigpt2.formats.tokenizer import EOT

CHUNK_BYTES = 1 << 20  # a block is about this much input: big enough to encode efficiently
# A non-space char followed by a space or newline: no GPT-2 pretoken spans this edge and the
# split regex has no look-behind, so encoding the two sides separately gives the same tokens.
SAFE_CUT = re.compile(r"[^\s][ \n]")
PARQUET_EXTRA = "pip install 'mpigpt2[parquet]' (pyarrow)"


@dataclass(frozen=True)
class CorpusSpec:
    """What to read and how: the same on every worker (picklable for spawned processes)."""
    kind: str  # text | jsonl | parquet
    paths: tuple
    field: str = "text"
    chunk_bytes: int = CHUNK_BYTES
    skip_bad: bool = False


@dataclass
class Block:
    """One unit of work. payload: str (text), bytes of whole lines (jsonl) or a row-group
    number (parquet); bos: the block starts a document (text); line: its first line/row."""
    index: int
    path: str
    payload: object
    bos: bool = False
    line: int = 1
    raw_end: int = 0  # bytes of the corpus on disk read once this block is cut


def last_safe_cut(buf):
    """Index where buf may be cut without changing its tokens, or None."""
    last = None
    for last in SAFE_CUT.finditer(buf, max(0, len(buf) - 65536)):
        pass
    if last is None:  # no cut near the end (one huge word?): look further back
        for last in SAFE_CUT.finditer(buf):
            pass
    return None if last is None else last.start() + 1


def _text_pieces(f, chunk_bytes):
    """(text, is_first) pieces of one UTF-8 file, cut only where tokens cannot change."""
    dec = codecs.getincrementaldecoder("utf-8")()
    buf, first, offset = "", True, 0
    try:
        while chunk := f.read(chunk_bytes):
            buf += dec.decode(chunk)
            offset += len(chunk)
            cut = last_safe_cut(buf)
            if cut is not None:
                yield buf[:cut], first
                buf, first = buf[cut:], False
        buf += dec.decode(b"", final=True)
    except UnicodeDecodeError as e:
        # e.start counts from the bytes the decoder held back from the previous chunk
        raise UserError(f"{f.path}: not UTF-8 text (bad byte near offset {offset + e.start}) — "
                        "convert it to UTF-8 or leave it out") from None
    if buf or first:
        yield buf, first


def _jsonl_pieces(f, chunk_bytes):
    """(bytes of whole lines, first line number) pieces of one JSON Lines file."""
    buf, line = b"", 1
    while chunk := f.read(chunk_bytes):
        buf += chunk
        cut = buf.rfind(b"\n")
        if cut >= 0:
            yield buf[:cut + 1], line
            line += buf.count(b"\n", 0, cut + 1)
            buf = buf[cut + 1:]
    if buf:
        yield buf, line


def require_pyarrow():
    """pyarrow.parquet, or a UserError naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading Parquet needs pyarrow: {PARQUET_EXTRA}") from None
    return pq


def _parquet_file(path, field):
    """pyarrow's ParquetFile for path, checked to hold the column `field`."""
    pq = require_pyarrow()
    if compression_of(path):
        raise UserError(f"input {path}: a {compression_of(path)}-compressed Parquet file; Parquet "
                        "compresses its pages itself — decompress the file first")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...: the file is not Parquet
        raise UserError(f"input {path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"input {path}: no column {field!r} (columns: {', '.join(names)}); "
                        "pick one with --field")
    return pf


def iter_blocks(spec):
    """Every block of the corpus in order, numbered from 0 (stream errors raise UserError)."""
    k, done = 0, 0
    for path in spec.paths:
        if spec.kind == "parquet":
            pf = _parquet_file(path, spec.field)
            n = pf.metadata.num_row_groups
            rows = 1
            for g in range(n):
                yield Block(k, path, g, line=rows, raw_end=done + os.path.getsize(path) * (g + 1) // n)
                rows += pf.metadata.row_group(g).num_rows
                k += 1
            done += os.path.getsize(path)
            continue
        with Opened(path) as f:
            if spec.kind == "text":
                for text, first in _text_pieces(f, spec.chunk_bytes):
                    yield Block(k, path, text, bos=first, raw_end=done + f.raw_pos)
                    k += 1
            else:
                for data, line in _jsonl_pieces(f, spec.chunk_bytes):
                    yield Block(k, path, data, line=line, raw_end=done + f.raw_pos)
                    k += 1
            done += os.path.getsize(path)


@dataclass
class Encoded:
    """A block's tokens and what was in it."""
    tokens: np.ndarray  # (n,) uint16
    docs: int = 0
    bad: int = 0
    first_bad: str = ""


def _bad(path, line, why):
    return f"{path}:{line}: {why}"


def _jsonl_docs(block, field):
    """(documents, bad-line messages) of a JSON Lines block."""
    docs, bad = [], []
    for i, raw in enumerate(block.payload.split(b"\n")):
        if not raw.strip():
            continue  # blank lines (and the final newline) are not documents
        where = block.line + i
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            bad.append(_bad(block.path, where, f"not UTF-8 ({e.reason})"))
            continue
        except ValueError as e:
            bad.append(_bad(block.path, where, f"invalid JSON ({e})"))
            continue
        if not isinstance(obj, dict) or field not in obj:
            bad.append(_bad(block.path, where, f"no field {field!r}"))
        elif not isinstance(obj[field], str):
            bad.append(_bad(block.path, where, f"field {field!r} is "
                                                f"{type(obj[field]).__name__}, not a string"))
        else:
            docs.append(obj[field])
    return docs, bad


def _parquet_docs(block, field):
    pf = _parquet_file(block.path, field)
    try:
        values = pf.read_row_group(block.payload, columns=[field]).column(field).to_pylist()
    except Exception as e:  # a damaged page or footer
        raise UserError(f"input {block.path}: corrupt Parquet row group {block.payload} "
                        f"({e})") from None
    docs, bad = [], []
    for i, v in enumerate(values):
        if isinstance(v, str):
            docs.append(v)
        else:
            bad.append(_bad(block.path, f"row {block.line + i}",
                            f"column {field!r} is {type(v).__name__}, not a string"))
    return docs, bad


def encode_block(block, spec, enc):
    """Tokens of one block: [EOT] + encode_ordinary(doc) for every document, in order. A bad
    line is a UserError naming file:line, or (skip_bad) skipped and counted."""
    if spec.kind == "text":
        ids = enc.encode_ordinary(block.payload)
        toks = np.empty(len(ids) + block.bos, dtype=np.uint16)
        toks[:block.bos] = EOT
        toks[block.bos:] = ids
        return Encoded(toks, docs=int(block.bos))
    docs, bad = (_jsonl_docs if spec.kind == "jsonl" else _parquet_docs)(block, spec.field)
    if bad and not spec.skip_bad:
        raise UserError(f"{bad[0]} — fix it, or pass --skip-bad to skip such lines")
    out = []
    for d in docs:
        out.append(EOT)
        out += enc.encode_ordinary(d)
    return Encoded(np.array(out, dtype=np.uint16), len(docs), len(bad), bad[0] if bad else "")

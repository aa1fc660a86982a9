"""CLI that tokenizes text into llm.c shards: tinyshakespeare (llm.c's split), or a corpus of text,
JSON Lines or Parquet files (llm.c's fineweb convention; docs/design.md#preparing-corpora)."""

import argparse
import hashlib
import os
import sys
import urllib.request

import numpy as np

from mpigpt2.base.files import check_writable, require_regular
from mpigpt2.base.errors import UserError, run_cli
from mpigpt2.formats.blocks import CHUNK_BYTES
from mpigpt2.formats.atomic import interrupts_held
from mpigpt2.formats.shards import ShardWriter
from mpigpt2.formats.tokenizer import EOT, gpt2_encoding
from mpigpt2.prepare_run import prepare_corpus

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_VAL = 32768  # llm.c's val split: the first 32,768 tokens (~10 %)


def _read_utf8(path, what):
    """Whole file as text (newlines translated, as llm.c's open().read() does)."""
    require_regular(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 (bad byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read ({e.strerror})") from None


def load_tinyshakespeare_text(input_path=None):
    """The text from --input, else $MPIGPT2_TEXT, else the char-rnn download (sha256-checked)."""
    if input_path:
        return _read_utf8(input_path, "--input")
    if os.environ.get("MPIGPT2_TEXT"):
        return _read_utf8(os.environ["MPIGPT2_TEXT"], "$MPIGPT2_TEXT")
    try:
        with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=30) as r:
            data = r.read()
    except (OSError, ValueError) as e:  # URLError, timeouts and socket errors are all OSError
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot download tinyshakespeare ({reason}); offline? pass "
                        "--input FILE or set MPIGPT2_TEXT=FILE") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != TINYSHAKESPEARE_SHA256:
        raise UserError(f"downloaded tinyshakespeare has sha256 {actual[:12]}…, expected "
                        f"{TINYSHAKESPEARE_SHA256[:12]}…; pass --input FILE with the real text")
    return data.decode("utf-8").replace("\r\n", "\n")


def tokenize_tinyshakespeare(text, enc=None):
    """llm.c's tokenization: EOT before every blank-line-separated section (uint16 array)."""
    enc = enc or gpt2_encoding()
    # llm.c inserts <|endoftext|> after each "\n\n" and at the start; tiktoken encodes the text
    # between special tokens independently, so this is the same as encoding each section alone.
    sections = text.split("\n\n")
    pieces = [s + "\n\n" for s in sections[:-1]] + sections[-1:]
    encoded = enc.encode_ordinary_batch(pieces)
    out = np.empty(len(pieces) + sum(len(e) for e in encoded), dtype=np.uint16)
    i = 0
    for e in encoded:
        out[i] = EOT
        out[i + 1:i + 1 + len(e)] = e
        i += 1 + len(e)
    return out


def prepare_tinyshakespeare(out_dir="data/tinyshakespeare", input_path=None):
    """Write tiny_shakespeare_{val,train}.bin to out_dir; returns (val, train) token counts."""
    tokens = tokenize_tinyshakespeare(load_tinyshakespeare_text(input_path))
    if len(tokens) <= TINYSHAKESPEARE_VAL:
        raise UserError(f"the text gives only {len(tokens)} tokens; tinyshakespeare needs more "
                        f"than {TINYSHAKESPEARE_VAL} (its val split) — pass the full --input")
    os.makedirs(out_dir, exist_ok=True)
    parts = [("val", tokens[:TINYSHAKESPEARE_VAL]), ("train", tokens[TINYSHAKESPEARE_VAL:])]
    writers = []
    try:
        for split, toks in parts:
            with interrupts_held():  # created and recorded as one: the cleanup finds it
                w = ShardWriter(os.path.join(out_dir, f"tiny_shakespeare_{split}.bin"))
                writers.append(w)
            w.write(toks)
            w.finish()
        for w in writers:  # publish only once both files are complete
            w.commit()
    except BaseException:
        for w in writers:  # drops what is still a temp file; a published one stays
            w.abort()
        raise
    for w in writers:
        print(f"wrote {w.count:,} tokens to {w.path}")
    return tuple(w.count for w in writers)


def prepare_text(files, out_dir, shard_tokens=100_000_000, val_tokens=32768,
                 chunk_bytes=CHUNK_BYTES, workers=1):
    """Tokenize UTF-8 files (one document each, EOT first) into text_{val,train}_NNNNNN.bin."""
    return prepare_corpus("text", files, out_dir, shard_tokens=shard_tokens,
                          val_tokens=val_tokens, chunk_bytes=chunk_bytes, workers=workers)


def _count(s, minimum):
    try:
        n = int(s.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"must be ≥ {minimum}, got {n}")
    return n


def positive_int(s):
    """argparse type: an integer ≥ 1 (underscores allowed, e.g. 100_000_000)."""
    return _count(s, 1)


def nonneg_int(s):
    """argparse type: an integer ≥ 0."""
    return _count(s, 0)


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback instead of a one-line error")
    p = argparse.ArgumentParser(prog="python -m mpigpt2.prepare", parents=[common],
                                description="Tokenize text (GPT-2 BPE) into llm.c token shards.")
    sub = p.add_subparsers(dest="cmd", required=True,
                           metavar="{tinyshakespeare,text,jsonl,parquet}")
    ts = sub.add_parser("tinyshakespeare", parents=[common],
                        help="tiny shakespeare, split like llm.c (val = first 32,768 tokens)")
    ts.add_argument("--input", metavar="FILE",
                    help="local copy of the text (else $MPIGPT2_TEXT, else download it)")
    ts.add_argument("--out-dir", default="data/tinyshakespeare", metavar="DIR",
                    help="where tiny_shakespeare_{val,train}.bin go (default: %(default)s)")
    for kind, what in CORPUS_KINDS.items():
        _corpus_parser(sub.add_parser(kind, parents=[common], help=what), kind)
    return p


CORPUS_KINDS = {
    "text": "UTF-8 text files, one document each",
    "jsonl": "JSON Lines, one document per line (its --field)",
    "parquet": "Parquet files, one document per row (column --field; needs mpigpt2[parquet])"}


def _corpus_parser(c, kind):
    """The flags every corpus format shares (docs/design.md#preparing-corpora)."""
    c.add_argument("files", nargs="+", metavar="FILE",
                   help="files, directories or globs, in order; gzip/zstd/xz-compressed is fine")
    c.add_argument("--out-dir", required=True, metavar="DIR",
                   help="where PREFIX_val_000000.bin, PREFIX_train_NNNNNN.bin and manifest.json "
                        "go; rerunning the same command resumes an interrupted run")
    c.add_argument("--prefix", default=kind, metavar="NAME",
                   help="shard file name prefix (default: %(default)s)")
    if kind != "text":
        c.add_argument("--field", default="text", metavar="NAME",
                       help="the key (jsonl) or column (parquet) holding each document's text "
                            "(default: %(default)s)")
        c.add_argument("--skip-bad", action="store_true",
                       help="skip (and count) lines that are not JSON or lack the field, "
                            "instead of stopping at the first")
    c.add_argument("--shard-tokens", type=positive_int, default=100_000_000,
                   metavar="N", help="tokens per shard (default: %(default)s)")
    c.add_argument("--val-tokens", type=nonneg_int, default=None, metavar="N",
                   help="the first N tokens form the val shard (default: 32768 unless "
                        "--val-shards is given)")
    c.add_argument("--val-shards", type=nonneg_int, default=0, metavar="K",
                   help="the first K whole shards are val (llm.c: 1); excludes --val-tokens")
    c.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="encoding processes (default: the CPUs, or 1 for inputs under 4 MB; "
                        "under mpiexec each rank is one)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def check_out_dir(out_dir):
    """--out-dir is, or can become, a writable directory (checked before any reading)."""
    if not out_dir:
        raise UserError("--out-dir is empty; give a directory for the shards")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} exists and is not a directory")
    check_writable(out_dir, "--out-dir")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_out_dir(args.out_dir)
    if args.cmd == "tinyshakespeare":
        prepare_tinyshakespeare(args.out_dir, args.input)
    else:
        val_tokens = args.val_tokens
        if val_tokens is None:
            val_tokens = 0 if args.val_shards else 32768
        try:
            prepare_corpus(args.cmd, args.files, args.out_dir,
                           field=getattr(args, "field", "text"), prefix=args.prefix,
                           shard_tokens=args.shard_tokens, val_tokens=val_tokens,
                           val_shards=args.val_shards, workers=args.workers,
                           skip_bad=getattr(args, "skip_bad", False), quiet=args.quiet)
        except KeyboardInterrupt:
            print(f"interrupted: the finished shards stay in {args.out_dir}; run the same "
                  "command again to continue", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

"""CLI that tokenizes text into llm.c shards: tinyshakespeare (llm.c's split) or any UTF-8 files."""

import argparse
import codecs
import contextlib
import glob
import hashlib
import os
import re
import sys
import urllib.request

import numpy as np

from mpigpt2.base.files import check_writable, require_regular
from mpigpt2.base.errors import UserError, run_cli
from mpigpt2.formats.shards import ShardWriter
from mpigpt2.formats.tokenizer import EOT, gpt2_encoding

TINYSHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                       "tinyshakespeare/input.txt")
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_VAL = 32768  # llm.c's val split: the first 32,768 tokens (~10 %)
CHUNK_BYTES = 1 << 22  # text is read and encoded in ~4 MB pieces; big enough to batch well
PROGRESS_BYTES = 8 << 20  # show a progress bar above this much input
# A non-space char followed by a space or newline: no GPT-2 pretoken spans this edge and the
# split regex has no look-behind, so encoding the two sides separately gives the same tokens.
_SAFE_CUT = re.compile(r"[^\s][ \n]")


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
            w = ShardWriter(os.path.join(out_dir, f"tiny_shakespeare_{split}.bin"))
            writers.append(w)
            w.write(toks)
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:  # publish only once both files are complete
        w.commit()
        print(f"wrote {w.count:,} tokens to {w.path}")
    return tuple(w.count for w in writers)


class _ShardSink:
    """Routes a token stream: the first val_tokens to one val shard, the rest to train shards."""

    def __init__(self, out_dir, shard_tokens, val_tokens):
        self.out_dir, self.shard_tokens, self.val_left = out_dir, shard_tokens, val_tokens
        self.val, self.train = None, []

    def put(self, toks):
        toks = np.asarray(toks, dtype=np.int64)
        while len(toks):
            if self.val_left > 0:
                if self.val is None:
                    self.val = ShardWriter(os.path.join(self.out_dir, "text_val_000000.bin"))
                w, room = self.val, self.val_left
            else:
                if not self.train or self.train[-1].count >= self.shard_tokens:
                    if self.train:
                        self.train[-1].finish()  # closes its file: one open shard at a time
                    name = f"text_train_{len(self.train):06d}.bin"
                    self.train.append(ShardWriter(os.path.join(self.out_dir, name)))
                w, room = self.train[-1], self.shard_tokens - self.train[-1].count
            n = min(room, len(toks))
            w.write(toks[:n])
            toks = toks[n:]
            if w is self.val:
                self.val_left -= n

    def writers(self):
        return ([self.val] if self.val else []) + self.train


def _check_utf8(path):
    """Decode the whole file once so a bad byte fails before anything is written."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                dec.decode(chunk)
                offset += len(chunk)
            dec.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte near offset {offset + e.start}) — "
                        "convert it to UTF-8 or leave it out") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _encode_file(path, enc, sink, chunk_bytes, bar):
    """Stream one file through the tokenizer in chunks cut only where tokens cannot change."""
    dec = codecs.getincrementaldecoder("utf-8")()
    buf = ""
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            buf += dec.decode(chunk)
            bar.update(len(chunk))
            last = None
            for last in _SAFE_CUT.finditer(buf, max(0, len(buf) - 65536)):
                pass
            if last is None:  # no cut near the end (one huge word?): look further back
                for last in _SAFE_CUT.finditer(buf):
                    pass
            if last is not None:
                cut = last.start() + 1
                sink.put(enc.encode_ordinary(buf[:cut]))
                buf = buf[cut:]
    buf += dec.decode(b"", final=True)
    sink.put(enc.encode_ordinary(buf))


class _NoBar:
    def update(self, n):
        pass


def _progress(total):
    """A tqdm byte counter on stderr for big inputs; silent when tqdm is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(_NoBar())
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing",
                disable=total < PROGRESS_BYTES, file=sys.stderr)


def prepare_text(files, out_dir, shard_tokens=100_000_000, val_tokens=32768,
                 chunk_bytes=CHUNK_BYTES):
    """Tokenize UTF-8 files (one document each, EOT first) into text_{val,train}_NNNNNN.bin."""
    if shard_tokens < 1 or val_tokens < 0:
        raise UserError("--shard-tokens must be ≥ 1 and --val-tokens ≥ 0")
    for p in files:
        require_regular(p, "input")
        _check_utf8(p)
    enc = gpt2_encoding()
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sink = _ShardSink(out_dir, shard_tokens, val_tokens)
    try:
        with _progress(sum(os.path.getsize(p) for p in files)) as bar:
            for p in files:
                sink.put([EOT])
                _encode_file(p, enc, sink, chunk_bytes, bar)
        if not sink.train:
            total = sink.val.count if sink.val else 0
            raise UserError(f"the inputs give only {total} tokens, none left for training after "
                            f"--val-tokens {val_tokens}; lower --val-tokens or add text")
        for w in sink.writers():
            if not w.done:
                w.finish()
    except BaseException:
        for w in sink.writers():
            w.abort()
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)
        raise
    written = set()
    for w in sink.writers():  # publish only once every shard is complete
        w.commit()
        written.add(os.path.abspath(w.path))
        print(f"wrote {w.count:,} tokens to {w.path}")
    # Shards left by an earlier, larger run would silently join a --train-data glob.
    for old in sorted(glob.glob(os.path.join(out_dir, "text_*_" + "[0-9]" * 6 + ".bin"))):
        if os.path.abspath(old) not in written:
            os.unlink(old)
            print(f"removed stale shard {old}")
    return [w.count for w in sink.writers()]


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
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{tinyshakespeare,text}")
    ts = sub.add_parser("tinyshakespeare", parents=[common],
                        help="tiny shakespeare, split like llm.c (val = first 32,768 tokens)")
    ts.add_argument("--input", metavar="FILE",
                    help="local copy of the text (else $MPIGPT2_TEXT, else download it)")
    ts.add_argument("--out-dir", default="data/tinyshakespeare", metavar="DIR",
                    help="where tiny_shakespeare_{val,train}.bin go (default: %(default)s)")
    tx = sub.add_parser("text", parents=[common],
                        help="any UTF-8 files, one document each, into sharded .bin files")
    tx.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files to tokenize")
    tx.add_argument("--out-dir", required=True, metavar="DIR",
                    help="where text_val_000000.bin and text_train_NNNNNN.bin go")
    tx.add_argument("--shard-tokens", type=positive_int, default=100_000_000,
                    metavar="N", help="tokens per train shard (default: %(default)s)")
    tx.add_argument("--val-tokens", type=nonneg_int, default=32768, metavar="N",
                    help="first N tokens form the val shard; 0 = none (default: %(default)s)")
    return p


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
        prepare_text(args.files, args.out_dir, args.shard_tokens, args.val_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

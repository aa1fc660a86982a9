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
from mpigpt2.formats.data import DataLoader
from mpigpt2.base.errors import UserError
from mpigpt2.formats.mt19937 import MT19937, random_permutation
from mpigpt2.options import parse_args
from mpigpt2.formats.shards import HEADER_BYTES, MAGIC, read_shard, shard_paths, write_shard
from mpigpt2.formats.tokenizer import EOT, GPT2_VOCAB, gpt2_encoding

from helpers import REPO  # noqa: E402
from helpers import TEXT  # noqa: E402  (honours $MPIGPT2_TEXT)


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
    names = sorted(p.name for p in out.glob("*.bin"))
    # llm.c's naming (dev/data/fineweb.py): one shard index over val and train
    assert names[-1] == "text_val_000000.bin" and len(names) >= 3
    assert names[:-1] == [f"text_train_{i:06d}.bin" for i in range(1, len(names))]
    shards = [read_shard(out / n) for n in names[-1:] + names[:-1]]
    assert [len(s) for s in shards] == counts
    assert len(shards[0]) == 500 and all(len(s) == 700 for s in shards[1:-1])
    np.testing.assert_array_equal(np.concatenate(shards), ref)
    # a rerun with other options refuses the directory instead of mixing two runs' shards
    with pytest.raises(UserError, match="holds the shards of another prepare run"):
        prepare.main(["text", *map(str, files), "--out-dir", str(out), "--shard-tokens",
                      "100_000", "--val-tokens", "500"])
    assert sorted(p.name for p in out.glob("*.bin")) == names


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


@pytest.mark.parametrize("shuffle", [False, True, "llmc"])
def test_row_shares_match_full_batch(tmp_path, shuffle):
    paths = make_shards(tmp_path, [50, 41])
    full = batches(DataLoader(paths, 4, 3, vocab_size=GPT2_VOCAB, shuffle=shuffle), 9)
    for r in [slice(0, 2), slice(2, 4), slice(1, 2), slice(3, None)]:
        part = batches(DataLoader(paths, 4, 3, vocab_size=GPT2_VOCAB, shuffle=shuffle), 9, r)
        for (x, y), (px, py) in zip(full, part):
            np.testing.assert_array_equal(px, x[r])
            np.testing.assert_array_equal(py, y[r])


@pytest.mark.parametrize("shuffle", [False, True, "llmc"])
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


# -- llm.c's shuffled order (--shuffle llmc) ------------------------------------------------

class PlainMT:
    """Textbook MT19937, one word at a time (a second implementation for the tests)."""

    def __init__(self, seed):
        self.mt = [seed & 0xFFFFFFFF]
        for j in range(1, 624):
            p = self.mt[-1]
            self.mt.append((1812433253 * (p ^ (p >> 30)) + j) & 0xFFFFFFFF)
        self.k = 624

    def __call__(self):
        mt = self.mt
        if self.k == 624:
            for i in range(624):
                y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
                mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.k = 0
        y = mt[self.k]
        self.k += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


def plain_permutation(n, rand, data=None):
    """llm.c's random_permutation: shuffles `data` (default: the identity) in place."""
    data = list(range(n)) if data is None else data
    for i in range(n - 1, 0, -1):
        j = rand() % (i + 1)
        data[i], data[j] = data[j], data[i]
    return data


def llmc_shuffled_order(paths, B, T, steps):
    """llm.c's shuffled DataLoader (one process) restated with plain loops: reset at init and
    after the last shard, advance lazily when a shard's samples run out."""
    toks = [np.asarray(read_shard(p), dtype=np.int32) for p in paths]
    rand = PlainMT(42)
    st = {}

    def load(k):
        st["shard"], st["sample"] = k, 0
        n = (len(toks[st["order"][k]]) - 1) // (B * T)
        st["n"], st["samples"] = n, plain_permutation(n, rand)

    st["order"] = list(range(len(paths)))  # dataloader_init: identity, once

    def reset():  # dataloader_reset: shuffle the previous epoch's shard order again
        st["order"] = plain_permutation(len(paths), rand, st["order"])
        load(0)

    reset()
    out = []
    for _ in range(steps):
        if st["sample"] >= st["n"]:
            if st["shard"] == len(paths) - 1:
                reset()
            else:
                load(st["shard"] + 1)
        start = st["samples"][st["sample"]] * B * T
        w = toks[st["order"][st["shard"]]][start:start + B * T + 1]
        out.append((w[:-1].reshape(B, T), w[1:].reshape(B, T)))
        st["sample"] += 1
    return out


def test_mt19937_known_values():
    r = MT19937(5489)
    first = r.draw(10000)
    assert first[0] == 3499211612 and first[-1] == 4123659995  # std::mt19937's 10000th
    ref = PlainMT(5489)
    assert [ref() for _ in range(1300)] == first[:1300].tolist()
    for seed in (0, 1, 42, 2 ** 32 - 1):
        raw = np.random.RandomState(seed)._bit_generator.random_raw(5000)  # init_genrand too
        r = MT19937(seed)
        got = np.concatenate([r.draw(k) for k in (1, 622, 1, 1, 700, 0, 2675)])
        np.testing.assert_array_equal(got, raw[:4000])
        assert r.position == 4000
        assert r.randint32() == raw[4000]
        s = MT19937(seed)
        for k in (3, 621, 0, 1, 1248, 5):  # skip lands on, before and after refills
            s.skip(k)
        assert s.position == 1878
        np.testing.assert_array_equal(s.draw(100), raw[1878:1978])
    with pytest.raises(ValueError):
        MT19937(-1)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 700, 1500])
def test_random_permutation_is_llmc_fisher_yates(n):
    r, ref = MT19937(42), PlainMT(42)
    for _ in range(2):  # consecutive permutations share one stream
        got = random_permutation(n, r)
        assert got.tolist() == plain_permutation(n, ref)
    assert r.position == 2 * max(n - 1, 0)
    assert r.randint32() == ref()


@pytest.mark.parametrize("sizes, B, T", [([41, 29, 23], 2, 2), ([65, 40], 3, 2), ([50], 2, 3)])
def test_llmc_order_matches_reference(tmp_path, sizes, B, T):
    paths = make_shards(tmp_path, sizes)
    dl = DataLoader(paths, B, T, vocab_size=GPT2_VOCAB, shuffle="llmc", seed=123)  # seed unused
    n = dl.batches_per_epoch
    steps = 3 * n + 2  # three epoch wraps, every shard entered three times
    for k, ((x, y), (ex, ey)) in enumerate(zip(batches(dl, steps),
                                               llmc_shuffled_order(paths, B, T, steps))):
        np.testing.assert_array_equal(x, ex, err_msg=f"step {k}")
        np.testing.assert_array_equal(y, ey, err_msg=f"step {k}")
    assert dl.epoch == 3
    plain = [tuple(x.ravel()) for x, _ in batches(DataLoader(paths, B, T,
                                                             vocab_size=GPT2_VOCAB), n)]
    dl = DataLoader(paths, B, T, vocab_size=GPT2_VOCAB, shuffle="llmc")
    e0, e1 = ([tuple(x.ravel()) for x, _ in batches(dl, n)] for _ in range(2))
    assert e0 != plain and e1 != e0 and sorted(e0) == sorted(e1) == sorted(plain)


def test_llmc_step0_is_first_of_permutation(tmp_path):
    """One shard: no shard draws, the first window is perm[0] of the 42-seeded stream."""
    paths = make_shards(tmp_path, [200])
    dl = DataLoader(paths, 4, 4, vocab_size=GPT2_VOCAB, shuffle="llmc")
    perm = plain_permutation(199 // 16, PlainMT(42))
    assert perm[0] != 0
    assert dl.state() == {"epoch": 0, "shard": 0, "position": perm[0] * 16, "num_shards": 1,
                          "order": "llmc"}
    np.testing.assert_array_equal(dl.next_batch()[0].ravel(),
                                  read_shard(paths[0])[perm[0] * 16:perm[0] * 16 + 16])


def test_llmc_resume_everywhere(tmp_path):
    """Resuming from the state at every step of three epochs, in a fresh loader and by
    rewinding a loader whose stream is already further, continues the same batches."""
    paths = make_shards(tmp_path, [41, 29, 23])
    dl = DataLoader(paths, 2, 2, vocab_size=GPT2_VOCAB, shuffle="llmc")
    n = dl.batches_per_epoch
    states, xs = [], []
    for _ in range(3 * n):
        states.append(json.loads(json.dumps(dl.state())))
        xs.append(dl.next_batch()[0])
    rewound = DataLoader(paths, 2, 2, vocab_size=GPT2_VOCAB, shuffle="llmc")
    batches(rewound, 3 * n)
    for k in list(range(0, 3 * n, 3)) + [n - 1, n, 2 * n]:
        fresh = DataLoader(paths, 2, 2, vocab_size=GPT2_VOCAB, shuffle="llmc")
        for loader in (fresh, rewound):
            loader.set_state(states[k])
            for x in xs[k:k + n + 2]:  # past the next epoch start
                np.testing.assert_array_equal(loader.next_batch()[0], x)


def test_order_recorded_and_checked_on_resume(tmp_path):
    paths = make_shards(tmp_path, [41, 29])
    make = lambda shuffle: DataLoader(paths, 2, 2, vocab_size=GPT2_VOCAB, shuffle=shuffle)
    for shuffle, order in [(False, "sequential"), (None, "sequential"), (True, "seeded"),
                           ("seeded", "seeded"), ("llmc", "llmc")]:
        dl = make(shuffle)
        assert dl.order == order and bool(dl.shuffle) == (order != "sequential")
        assert dl.state()["order"] == order
    state = make("llmc").state()
    with pytest.raises(UserError, match=r"saved with --shuffle llmc but this run has no "
                                        r"--shuffle; resume with the same --shuffle"):
        make(False).set_state(state)
    legacy = {k: v for k, v in make(False).state().items() if k != "order"}
    make("llmc").set_state(legacy)  # states from before the order was recorded still load
    with pytest.raises(UserError, match="--shuffle must be one of"):
        make("random")


def test_sequential_default_and_seeded_unchanged(tmp_path):
    paths = make_shards(tmp_path, [30, 25, 17])
    dl = DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB)
    assert dl.shuffle is False and dl.order == "sequential"
    for (x, _), (ex, _) in zip(batches(dl, 12), llmc_order(paths, 2, 4, 12)):
        np.testing.assert_array_equal(x, ex)
    a = batches(DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB, shuffle=True, seed=3), 12)
    b = batches(DataLoader(paths, 2, 4, vocab_size=GPT2_VOCAB, shuffle="seeded", seed=3), 12)
    for (x, _), (x2, _) in zip(a, b):
        np.testing.assert_array_equal(x, x2)
    # the seeded order is still numpy's default_rng([seed, epoch]) / ([seed, epoch, shard])
    order = np.random.default_rng([3, 0]).permutation(3)
    wins = np.random.default_rng([3, 0, int(order[0])]).permutation(dl.nwin[int(order[0])])
    start = int(wins[0]) * 8
    np.testing.assert_array_equal(a[0][0].ravel(),
                                  read_shard(paths[int(order[0])])[start:start + 8])


def test_shuffle_flag():
    assert parse_args([]).shuffle is None
    assert parse_args(["--shuffle"]).shuffle == "seeded"
    assert parse_args(["--shuffle", "--steps", "2"]).shuffle == "seeded"
    assert parse_args(["--shuffle", "llmc"]).shuffle == "llmc"
    assert parse_args(["--shuffle=seeded"]).shuffle == "seeded"
    with pytest.raises(SystemExit):
        parse_args(["--shuffle", "numpy"])

"""prepare on bad corpora: one line `error: …`, status 2, and nothing left behind (also after
shards were already written); --skip-bad skips and counts. train refuses shards that differ from
their manifest."""

import gzip
import json
import sys

import numpy as np
import pytest

from helpers import PY, run
from mpigpt2 import prepare
from mpigpt2.base.errors import UserError, run_cli
from mpigpt2.formats.data import DataLoader
from prepare_reference import (compress, documents, expected_shards, shards_in, write_jsonl,
                               write_parquet)

GOOD = [json.dumps({"text": d}) for d in documents(300, seed=7)]  # ~ 60 shards of 300 tokens


def jsonl(path, lines, how=""):
    path.write_bytes(compress(b"\n".join(x if isinstance(x, bytes) else x.encode()
                                         for x in lines) + b"\n", how))
    return path


def fails(capsys, argv, message):
    """prepare's CLI exits 2 with one line naming message."""
    with pytest.raises(SystemExit) as e:
        run_cli(prepare.main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    return err


def argv(kind, paths, out, *extra):
    return [kind, *map(str, paths), "--out-dir", str(out), "--shard-tokens", "300",
            "--val-tokens", "100", "--workers", "1", "--quiet", *extra]


LATE = len(GOOD) + 1  # the bad line comes after ~60 shards were published


@pytest.mark.parametrize("bad,message", [
    ('{"text": "unterminated', f"a.jsonl:{LATE}: invalid JSON"),
    ('{"body": "no text field"}', f"a.jsonl:{LATE}: no field 'text'"),
    ('{"text": 5}', f"a.jsonl:{LATE}: field 'text' is int, not a string"),
    ('["text"]', f"a.jsonl:{LATE}: no field 'text'"),
    (b'{"text": "caf\xe9"}', f"a.jsonl:{LATE}: not UTF-8"),
])
def test_bad_line_names_file_and_line(tmp_path, capsys, bad, message):
    f = jsonl(tmp_path / "a.jsonl", GOOD + [bad] + GOOD[:5])
    fails(capsys, argv("jsonl", [f], tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()  # the shards written before the error are gone


def test_skip_bad_skips_counts_and_reports(tmp_path, capsys):
    bad = ['{"text": "unterminated', '{"body": 1}', b'\xff\xfe']
    lines = GOOD[:50] + bad[:1] + GOOD[50:100] + bad[1:] + GOOD[100:]
    f = jsonl(tmp_path / "a.jsonl", lines)
    assert prepare.main(argv("jsonl", [f], tmp_path / "out", "--skip-bad")) == 0
    out = capsys.readouterr().out
    assert "skipped 3 bad lines (first: " in out and "a.jsonl:51: invalid JSON" in out
    docs = [json.loads(x)["text"] for x in GOOD]
    assert shards_in(tmp_path / "out") == expected_shards(docs, 300, 100)


def test_first_bad_line_is_reported_whatever_the_workers(tmp_path):
    lines = GOOD[:150] + ['{"x": 1}'] + GOOD[150:] + ["not json"]
    f = jsonl(tmp_path / "a.jsonl", lines)
    for workers in ("1", "3"):
        r = run([PY, "-m", "mpigpt2.prepare", *argv("jsonl", [f], tmp_path / "o")[:-3],
                 "--workers", workers, "--quiet"], timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "a.jsonl:151: no field 'text'" in r.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", ["gz", "zst", "xz"])
def test_truncated_compressed_stream(tmp_path, capsys, how):
    data = compress(("\n".join(GOOD) + "\n").encode(), how)
    f = tmp_path / f"a.jsonl.{how}"
    f.write_bytes(data[:len(data) * 2 // 3])
    fails(capsys, argv("jsonl", [f], tmp_path / "out"), "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_non_utf8_text_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("fine text " * 200)
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    fails(capsys, argv("text", [tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out"),
          "b.txt: not UTF-8 text (bad byte near offset 3)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_parquet(tmp_path, capsys, damage):
    good = write_parquet(tmp_path, documents(40, seed=8), 1)[0]
    bad = tmp_path / "bad.parquet"
    data = good.read_bytes()
    bad.write_bytes(b"not parquet at all" * 10 if damage == "garbage" else data[:len(data) // 2])
    fails(capsys, argv("parquet", [good, bad], tmp_path / "out"), "bad.parquet: not a readable "
          "Parquet file")
    assert not (tmp_path / "out").exists()


def test_parquet_without_the_column_or_pyarrow(tmp_path, capsys, monkeypatch):
    f = write_parquet(tmp_path, documents(10, seed=9), 1)[0]
    gz = tmp_path / "c.parquet.gz"
    gz.write_bytes(gzip.compress(f.read_bytes()))
    fails(capsys, argv("parquet", [gz], tmp_path / "o"), "gzip-compressed Parquet file")
    fails(capsys, argv("parquet", [f], tmp_path / "o", "--field", "body"), "no column 'body'")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were missing
    fails(capsys, argv("parquet", [f], tmp_path / "o"), "pip install 'mpigpt2[parquet]'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lines", [[], ['{"text": ""}'] * 5, ['{"x": 1}']])
def test_empty_corpus(tmp_path, capsys, lines):
    f = jsonl(tmp_path / "a.jsonl", lines) if lines else tmp_path / "a.jsonl"
    f.touch()
    extra = ["--skip-bad"] if lines == ['{"x": 1}'] else []
    fails(capsys, argv("jsonl", [f], tmp_path / "out", *extra), "empty corpus")
    assert not (tmp_path / "out").exists()


def test_out_dir_of_another_run(tmp_path, capsys):
    a = write_jsonl(tmp_path, documents(100, seed=10), 2, "gz")
    out = tmp_path / "out"
    assert prepare.main(argv("jsonl", a, out)) == 0
    before = shards_in(out), (out / "manifest.json").read_bytes()
    fails(capsys, argv("jsonl", a, out, "--shard-tokens", "400"),
          "holds the shards of another prepare run (options shard_tokens: 300 there, 400 now)")
    fails(capsys, argv("jsonl", a[:1], out), "holds the shards of another prepare run (inputs")
    assert (shards_in(out), (out / "manifest.json").read_bytes()) == before
    (out / "manifest.json").unlink()
    fails(capsys, argv("jsonl", a, out), "already holds token shards")


def test_val_tokens_and_val_shards_exclude_each_other(tmp_path, capsys):
    f = jsonl(tmp_path / "a.jsonl", GOOD[:5])
    fails(capsys, argv("jsonl", [f], tmp_path / "o", "--val-shards", "1"), "not both")


# -- train checks the shards against the manifest ---------------------------------------------

@pytest.fixture
def prepared(tmp_path):
    f = jsonl(tmp_path / "a.jsonl", GOOD)
    assert prepare.main(argv("jsonl", [f], tmp_path / "out")) == 0
    return tmp_path / "out"


def loader(out):
    return DataLoader(str(out / "jsonl_train_*.bin"), 2, 8, vocab_size=50257)


def test_train_accepts_intact_shards(prepared):
    assert loader(prepared).batches_per_epoch > 0


def test_train_refuses_a_changed_shard(prepared):
    p = prepared / "jsonl_train_000003.bin"
    data = bytearray(p.read_bytes())
    data[-2:] = np.array([7], "<u2").tobytes()  # same size, valid ids: only the hash tells
    p.write_bytes(bytes(data))
    with pytest.raises(UserError, match="jsonl_train_000003.bin differs from .*manifest.json"):
        loader(prepared)


def test_train_refuses_an_unlisted_or_unfinished_run(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["name"] != "jsonl_train_000002.bin"]
    (prepared / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="jsonl_train_000002.bin is not listed in"):
        loader(prepared)
    m["complete"] = False
    (prepared / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="prepare has not finished"):
        loader(prepared)


def test_train_cli_exits_2_on_a_changed_shard(prepared, tmp_path):
    p = prepared / "jsonl_val_000000.bin"
    p.write_bytes(p.read_bytes()[:-2] + b"\x01\x00")
    r = run([PY, "-m", "mpigpt2.train", "--train-data", str(prepared / "jsonl_train_*.bin"),
             "--val-data", str(p), "--batch-size", "2", "--seq-len", "8", "--steps", "1",
             "--out-dir", str(tmp_path / "t")], timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "differs from" in r.stderr, r.stderr


def test_gzip_magic_not_name_decides(tmp_path):
    """A gzip file without .gz is read as gzip; the name alone never decides."""
    f = tmp_path / "plain_name.jsonl"
    f.write_bytes(gzip.compress(("\n".join(GOOD[:20]) + "\n").encode()))
    out = tmp_path / "out"
    assert prepare.main(argv("jsonl", [f], out)) == 0
    docs = [json.loads(x)["text"] for x in GOOD[:20]]
    assert shards_in(out) == expected_shards(docs, 300, 100)

"""The reported holes in the input readers, reproduced: an index naming files outside the model
directory, FIFOs given as inputs, report on malformed metrics.jsonl / trace.json / config.json,
a malformed peak cache. Each ends in one error line and exit status 2 (or, for the cache, a
fresh probe), in bounded time, with nothing on disk changed. (The fuzz tests of the same
readers are tests/unit/test_fuzz_readers.py.)"""

import contextlib
import io
import json
import os
import signal
from unittest import mock

import numpy as np
import pytest
from safetensors.numpy import save_file

from helpers import PY, digest, run, train_cmd
from mpigpt2 import report
from mpigpt2.base.errors import UserError
from mpigpt2.formats import hf
from mpigpt2.formats.llmc import read_header, write_model
from mpigpt2.formats.shards import read_shard
from mpigpt2.model.config import GPTConfig
from mpigpt2.model.params import tensor_shapes
from mpigpt2.observe import peak

CFG = GPTConfig(max_seq_len=16, vocab_size=50, padded_vocab_size=128, num_layers=1,
                num_heads=2, channels=8)
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
TIMEOUT = 60  # a reader blocked on a FIFO fails the test instead of hanging it


def params(seed=0):
    rng = np.random.default_rng(seed)
    p = {n: rng.standard_normal(s).astype(np.float32)
         for n, s in tensor_shapes(CFG, CFG.num_layers).items()}
    p["wte"][CFG.vocab_size:] = 0.0
    return p


@contextlib.contextmanager
def alarm(seconds=TIMEOUT):
    def ring(signum, frame):
        raise AssertionError(f"blocked for {seconds}s (a FIFO opened?)")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(fn, *needles):
    """fn() raises a one-line UserError containing every needle (in bounded time)."""
    with alarm(), pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def one_error_line(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


# -- model.safetensors.index.json: only plain file names inside the directory -----------------

@pytest.fixture
def sharded(tmp_path):
    """tmp/secret.safetensors (a whole model, outside) and tmp/m: a sharded HF model."""
    full = hf.hf_tensors(CFG, params())
    save_file(full, tmp_path / "secret.safetensors", metadata={"format": "pt"})
    m = tmp_path / "m"
    m.mkdir()
    names = sorted(full)
    parts = [names[0::2], names[1::2]]
    for shard, part in zip(SHARDS, parts):
        save_file({n: full[n] for n in part}, m / shard, metadata={"format": "pt"})
    (m / "config.json").write_text(json.dumps(hf.config_dict(CFG)))
    (m / "sub").mkdir()
    save_file(full, m / "sub" / "x.safetensors", metadata={"format": "pt"})
    weight_map = {n: SHARDS[i] for i, part in enumerate(parts) for n in part}
    write_index(m, weight_map)
    return m, weight_map


def write_index(m, weight_map):
    (m / hf.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_model_loads(sharded):
    m, weight_map = sharded
    ck = hf.Checkpoint(str(m))
    assert sorted(os.path.basename(f) for f in ck.files) == SHARDS
    np.testing.assert_array_equal(ck.load_all()["wte"], params()["wte"])
    os.symlink(SHARDS[1], m / "alias.safetensors")  # a symlink inside the directory is fine
    write_index(m, {k: "alias.safetensors" if v == SHARDS[1] else v
                    for k, v in weight_map.items()})
    assert hf.Checkpoint(str(m)).cfg == CFG


TRAVERSALS = ["../secret.safetensors", "{abs}", "../../../../etc/passwd", "/etc/passwd",
              "sub/../../secret.safetensors", "./x/../../secret.safetensors",
              "sub/x.safetensors", "./" + SHARDS[0], "..\\secret.safetensors",
              "sub\\x.safetensors", "file:///etc/passwd", "file:../secret.safetensors",
              "C:\\secret.safetensors", "\\\\host\\share\\x.safetensors", ".", "..", "", "/",
              "model\x00.safetensors", "x\n.safetensors", "~/secret.safetensors"]


@pytest.mark.parametrize("entry", TRAVERSALS)
def test_index_entry_outside_the_directory(sharded, entry):
    m, weight_map = sharded
    entry = entry.replace("{abs}", str(m.parent / "secret.safetensors"))
    first = sorted(weight_map)[0]
    write_index(m, dict(weight_map, **{first: entry}))
    before = digest(m.parent)
    msg = refused(lambda: hf.Checkpoint(str(m)), str(m / hf.INDEX), "weight_map entry")
    if entry.isprintable():
        assert f"'{entry}'" in msg
    assert digest(m.parent) == before


@pytest.mark.parametrize("target", ["../secret.safetensors", "{abs}", "sub/x.safetensors", "sub",
                                    "/etc/passwd", "/dev/zero"])
def test_index_symlink_pointing_outside(sharded, target):
    m, weight_map = sharded
    target = target.replace("{abs}", str(m.parent / "secret.safetensors"))
    os.symlink(target, m / "link.safetensors")
    write_index(m, {k: "link.safetensors" for k in weight_map})
    refused(lambda: hf.Checkpoint(str(m)), str(m / hf.INDEX), "'link.safetensors'")


@pytest.mark.parametrize("doc", [[1, 2], {"weight_map": 5}, {"weight_map": {}},
                                 {"weight_map": {"x": 5}}, {"weight_map": {"x": None}},
                                 {"weight_map": {"x": "missing.safetensors"}}, {}])
def test_malformed_index(sharded, doc):
    m, _ = sharded
    (m / hf.INDEX).write_text(json.dumps(doc))
    refused(lambda: hf.Checkpoint(str(m)), str(m / hf.INDEX))


def test_index_traversal_through_convert(sharded, tmp_path):
    m, weight_map = sharded
    write_index(m, {k: "../secret.safetensors" for k in weight_map})
    before = digest(tmp_path)
    r = run([PY, "-m", "mpigpt2.convert", "hf-to-llmc", str(m), str(tmp_path / "out.bin")],
            timeout=TIMEOUT)
    one_error_line(r, str(m / hf.INDEX), "'../secret.safetensors'")
    assert digest(tmp_path) == before


# -- FIFOs given as inputs: refused before they are opened ------------------------------------

def fifo(path):
    os.mkfifo(path)
    return path


def test_fifo_readers_in_process(tmp_path):
    refused(lambda: read_header(str(fifo(tmp_path / "m.bin"))), "not a regular file",
            "check --model")
    refused(lambda: read_shard(fifo(tmp_path / "s.bin")), "token shard", "not a regular file")
    refused(lambda: hf.read_config(str(fifo(tmp_path / "config.json"))), "not a regular file")
    m = tmp_path / "m"
    hf.write_checkpoint(m, CFG, params())
    (m / "config.json").unlink()
    fifo(m / "config.json")
    refused(lambda: hf.Checkpoint(str(m)), "config.json", "not a regular file")
    (m / "model.safetensors").unlink()
    fifo(m / "model.safetensors")
    refused(lambda: hf.Checkpoint(str(m)), "model.safetensors", "not a regular file")
    refused(lambda: hf.Checkpoint(str(m / "model.safetensors")), "not a regular file")


def test_fifo_in_an_index(sharded):
    m, weight_map = sharded
    fifo(m / "pipe.safetensors")
    write_index(m, {k: "pipe.safetensors" for k in weight_map})
    refused(lambda: hf.Checkpoint(str(m)), "'pipe.safetensors'", "not a regular file")


@pytest.fixture
def fifo_dir(tmp_path):
    """FIFOs in every input role, and a good HF model and llm.c model to go with them."""
    d = tmp_path / "in"
    d.mkdir()
    fifo(d / "model.bin")
    fifo(d / "shard.bin")
    fifo(d / "alone.safetensors")
    (d / "config.json").write_text(json.dumps(hf.config_dict(CFG)))  # beside alone.safetensors
    hf.write_checkpoint(d / "weights_fifo", CFG, params())
    (d / "weights_fifo" / "model.safetensors").unlink()
    fifo(d / "weights_fifo" / "model.safetensors")
    hf.write_checkpoint(d / "config_fifo", CFG, params())
    (d / "config_fifo" / "config.json").unlink()
    fifo(d / "config_fifo" / "config.json")
    write_model(str(d / "good.bin"), CFG, params())
    return d


@pytest.mark.parametrize("args,needles", [
    (["hf-to-llmc", "{d}/alone.safetensors", "{o}/out.bin"], ["alone.safetensors"]),
    (["hf-to-llmc", "{d}/weights_fifo", "{o}/out.bin"], ["model.safetensors"]),
    (["hf-to-llmc", "{d}/config_fifo", "{o}/out.bin"], ["config.json"]),
    (["llmc-to-hf", "{d}/model.bin", "{o}/hf"], ["model.bin"]),
], ids=["safetensors", "weights in dir", "config.json", "llm.c bin"])
def test_fifo_through_convert(fifo_dir, tmp_path, args, needles):
    out = tmp_path / "out"
    out.mkdir()
    before = digest(tmp_path)
    args = [a.replace("{d}", str(fifo_dir)).replace("{o}", str(out)) for a in args]
    r = run([PY, "-m", "mpigpt2.convert", *args], timeout=TIMEOUT)
    one_error_line(r, "not a regular file", *needles)
    assert digest(tmp_path) == before


@pytest.mark.parametrize("flags,needle", [
    (["--model", "{d}/model.bin"], "model.bin"),
    (["--model", "{d}/weights_fifo"], "model.safetensors"),
    (["--train-data", "{d}/shard.bin"], "shard.bin"),
    (["--val-data", "{d}/shard.bin"], "shard.bin"),
], ids=["--model bin", "--model hf dir", "--train-data", "--val-data"])
def test_fifo_through_train(fifo_dir, tmp_path, shards, flags, needle):
    out = tmp_path / "out"
    flags = [f.replace("{d}", str(fifo_dir)) for f in flags]
    r = run(train_cmd(shards, out, "--steps", "1", "--sample-tokens", "0", *flags),
            timeout=TIMEOUT)
    one_error_line(r, "not a regular file", needle)
    assert not out.exists()


def test_fifo_through_sample(fifo_dir):
    r = run([PY, "-m", "mpigpt2.sample", "--model", str(fifo_dir / "model.bin"), "--tokens",
             "2"], timeout=TIMEOUT)
    one_error_line(r, "not a regular file", "model.bin")


# -- report: every input checked before any picture is written ------------------------------

STEP = {"step": 0, "loss": 4.5, "lr": 1e-4, "step_ms": 100.0, "tokens_per_s": 640.0,
        "bubble": 0.0, "bubble_predicted": 0.0}


def rows(*recs):
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


GOOD = rows(dict(STEP, step=0), dict(STEP, step=1, loss=4.0), {"step": 2, "val_loss": 4.1},
            {"summary": True, "run": {}, "ranks": []})


def trace_doc():
    events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": 0,
               "args": {"name": "rank 0 (stage 0, replica 0)"}}]
    t = 0.0
    for s in range(2):
        for name, cat, dur in (("F0.0", "forward", 900.0), ("B0.0", "backward", 1800.0),
                               ("update", "update", 100.0)):
            events.append({"name": name, "cat": cat, "ph": "X", "pid": 0, "tid": 0, "ts": t,
                           "dur": dur, "args": {"step": s}})
            t += dur + 10
    return {"traceEvents": events, "metadata": {"layout": {"pp": 1, "dp": 1}}}


def run_dir(tmp_path, metrics=GOOD, trace=None, config=None):
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_bytes(metrics)
    for name, data in (("trace.json", trace), ("config.json", config)):
        if data is not None:
            (d / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return d


def report_refuses(d, *needles, argv=()):
    before = digest(d.parent)
    with contextlib.redirect_stdout(io.StringIO()):
        refused(lambda: report.main([str(d), *argv]), *needles)
    assert digest(d.parent) == before  # no loss.png half-way


BAD_ROWS = [b"[1,2]", b'{"step":"x","loss":1}', b'{"step":1,"loss":"nan","tokens_per_s":1}',
            b'{"step":1,"loss":1,"tokens_per_s":"fast"}', b"\xff\xfe{}",
            b'{"step":' + b"9" * 400 + b',"loss":1,"tokens_per_s":1}',
            b'{"step":1,"loss":1e300,"tokens_per_s":1}', b'{"step":1,"loss":1}', b'{"step":1}',
            b'{"step":true,"loss":1,"tokens_per_s":1}', b'"row"', b"", b"[" * 5000,
            b'{"step":1,"val_loss":[1]}', b'{"step":1,"loss":1,"tokens_per_s":1,"step_ms":"x"}',
            b'{"step":-1,"loss":1,"tokens_per_s":1}', b'{"summary":"yes"}']


@pytest.mark.parametrize("line", BAD_ROWS, ids=range(len(BAD_ROWS)))
def test_report_refuses_a_malformed_row(tmp_path, line):
    d = run_dir(tmp_path, GOOD[:GOOD.index(b"\n") + 1] + line + b"\n" + GOOD)
    report_refuses(d, f"{d / 'metrics.jsonl'}:2")


BAD_TRACES = [{"traceEvents": 5}, [], 5, {"traceEvents": [5]}, {"traceEvents": [{"ph": "X"}]},
              {"traceEvents": [{"ph": "X", "tid": 0, "ts": "a", "dur": 1, "args": {"step": 0}}]},
              {"traceEvents": [{"ph": "X", "tid": 0, "ts": 0, "dur": -1, "args": {"step": 0}}]},
              {"traceEvents": [{"ph": "X", "tid": 0, "ts": 0, "dur": 1, "args": [1]}]},
              {"traceEvents": [{"ph": "X", "tid": 0, "ts": 0, "dur": 1, "cat": [1]}]},
              {"traceEvents": [{"ph": "M", "name": "thread_name", "tid": 0, "args": {}}]},
              {"traceEvents": [{"ph": "B", "tid": 0, "ts": 0}]},
              {"traceEvents": [], "metadata": {"layout": {"pp": "x"}}},
              {"traceEvents": [], "metadata": 3},
              b"\xff", b"{", b"[" * 5000, dict(trace_doc(), traceEvents=[])]


@pytest.mark.parametrize("trace", BAD_TRACES, ids=range(len(BAD_TRACES)))
def test_report_refuses_a_malformed_trace(tmp_path, trace):
    d = run_dir(tmp_path, trace=trace)
    report_refuses(d, "trace.json")


@pytest.mark.parametrize("config", [[1], {"layout": 5}, {"layout": {"pp": "x"}},
                                    {"layout": {"pp": 1}}, {"args": {"seq_len": "x"}},
                                    {"args": 3}, b"\xff", b"{"], ids=range(8))
def test_report_refuses_a_malformed_config(tmp_path, config):
    d = run_dir(tmp_path, config=config)
    report_refuses(d, "config.json")


def test_report_tolerates_a_torn_last_line_and_null_losses(tmp_path):
    d = run_dir(tmp_path, GOOD + rows(dict(STEP, step=3, loss=None)) + b'{"step": 4, "lo',
                trace=trace_doc(), config={"layout": {"pp": 1, "dp": 1, "microbatches": 1,
                                                      "slice_tokens": 8},
                                           "args": {"seq_len": 32}})
    r = run([PY, "-m", "mpigpt2.report", str(d)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"note: {d / 'metrics.jsonl'}:6: skipped the torn last line" in r.stdout
    for name in ("loss.png", "throughput.png", "timeline.png"):
        assert (d / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_one_line_and_nothing_written(tmp_path):
    d = run_dir(tmp_path, GOOD + b"[1,2]\n" + GOOD)
    before = digest(tmp_path)
    one_error_line(run([PY, "-m", "mpigpt2.report", str(d)], timeout=120),
                   f"{d / 'metrics.jsonl'}:5")
    (d / "metrics.jsonl").write_bytes(GOOD)
    (d / "trace.json").write_text('{"traceEvents": 5}')
    before = digest(tmp_path)
    one_error_line(run([PY, "-m", "mpigpt2.report", str(d)], timeout=120), "trace.json")
    assert digest(tmp_path) == before and not (d / "loss.png").exists()
    (d / "trace.json").unlink()
    (tmp_path / "file").write_text("x")
    one_error_line(run([PY, "-m", "mpigpt2.report", str(d), "--out", str(tmp_path / "file")],
                       timeout=120), "not a directory")


@pytest.mark.parametrize("name", ["metrics.jsonl", "trace.json", "config.json"])
def test_report_refuses_a_fifo(tmp_path, name):
    d = run_dir(tmp_path)
    if name == "metrics.jsonl":
        (d / name).unlink()
    fifo(d / name)
    before = digest(tmp_path)
    one_error_line(run([PY, "-m", "mpigpt2.report", str(d)], timeout=TIMEOUT), name,
                   "not a regular file")
    assert digest(tmp_path) == before


# -- the peak cache: anything implausible is ignored, re-probed and replaced --------------------

@pytest.fixture
def cache(tmp_path):
    path = tmp_path / "cache" / "mpigpt2" / "peak.json"
    path.parent.mkdir(parents=True)
    with mock.patch.object(peak, "CACHE", str(path)), \
            mock.patch.object(peak, "probe_peak_gflops", return_value=37.5) as probe:
        yield path, probe


def record(gflops):
    return json.dumps({"key": peak.cache_key(), "gflops": gflops}).encode()


@pytest.mark.parametrize("content", [b"[1,2]", record(-5), b'{"key": "k", "gflops": NaN}',
                                     record(float("nan")), record("12"), record(1e300),
                                     record(10**400), record(0), record(True), record(None),
                                     b"\xff\xfe\x00", b"", b"5", b'"x"', b"[" * 5000,
                                     b"{" + b" " * 10000 + b"}", record(2e6)],
                         ids=range(17))
def test_malformed_peak_cache_is_reprobed(cache, content):
    path, probe = cache
    path.write_bytes(content)
    assert peak.peak_gflops_per_core() == (37.5, "probe")
    assert json.loads(path.read_text()) == {"key": peak.cache_key(), "gflops": 37.5}
    assert [p.name for p in path.parent.iterdir()] == ["peak.json"]  # no temp file left


@pytest.mark.parametrize("kind", ["fifo", "dangling symlink", "directory"])
def test_peak_cache_not_a_file(cache, kind):
    path, probe = cache
    if kind == "fifo":
        fifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        os.symlink(path.parent / "nowhere", path)
    with alarm():
        assert peak.peak_gflops_per_core() == (37.5, "probe")
    if kind != "directory":  # replaced by a valid cache, not written through
        assert path.is_file() and not path.is_symlink()
        assert not (path.parent / "nowhere").exists()
        assert peak.read_cache(peak.cache_key()) == 37.5


def test_plausible_peak_cache_is_used(cache):
    path, probe = cache
    path.write_bytes(record(12.25))
    assert peak.peak_gflops_per_core() == (12.25, f"cached probe ({path})")
    assert not probe.called
    path.write_bytes(json.dumps({"key": "another machine", "gflops": 12.25}).encode())
    assert peak.peak_gflops_per_core()[1] == "probe"


def test_xdg_cache_home_read_at_import(tmp_path):
    code = "import mpigpt2.observe.peak as p; print(p.CACHE)"
    for xdg, want in [(str(tmp_path), str(tmp_path / "mpigpt2" / "peak.json")),
                      ("relative/dir", os.path.expanduser("~/.cache/mpigpt2/peak.json")),
                      ("", os.path.expanduser("~/.cache/mpigpt2/peak.json"))]:
        r = run([PY, "-c", code], env={"XDG_CACHE_HOME": xdg}, timeout=TIMEOUT)
        assert r.returncode == 0 and r.stdout.strip() == want, (xdg, r.stdout, r.stderr)


def test_negative_cached_peak_does_not_reach_mfu(tmp_path, shards):
    """The reported case: a cached -5 GFLOP/s printed "MFU -145%"."""
    xdg = tmp_path / "xdg"
    (xdg / "mpigpt2").mkdir(parents=True)
    (xdg / "mpigpt2" / "peak.json").write_bytes(record(-5))
    r = run(train_cmd(shards, tmp_path / "o", "--steps", "1", "--sample-tokens", "0",
                      "--val-data", "", "--no-final-checkpoint"),
            env={"XDG_CACHE_HOME": str(xdg)}, timeout=240)
    assert r.returncode == 0, r.stderr
    assert "MFU" in r.stdout and "MFU -" not in r.stdout, r.stdout
    cached = json.loads((xdg / "mpigpt2" / "peak.json").read_text())
    assert cached["key"] == peak.cache_key() and 0 < cached["gflops"] < 1e6

"""Every input reader fuzzed with hypothesis: llm.c model files (read_header, load_params,
models.load_config), token shards (read_shard), safetensors headers and
model.safetensors.index.json (hf.Checkpoint), an HF config.json, a checkpoint's state.json
(checkpoint.read_state), metrics.jsonl (runlog.rows_before and report), trace.json and
config.json (report) and the peak cache (observe.peak).

The inputs are mutations of real files (byte flips, truncation, extension, header fields
replaced by random ints, JSON fields replaced by random JSON, traversal forms in an index) and
random bytes. The only outcomes allowed: success, or a UserError whose message is one line
(printable on a UTF-8 stderr); never another exception, never a hang (each call runs under an
alarm), and no file on disk changes (the directories involved are hashed before and after).

Reproducible and bounded: derandomized, no example database, a few dozen examples per test
(the file runs in well under a minute on 2 cores). A release check runs many more:

    MPIGPT2_FUZZ_EXAMPLES=5000 .venv/bin/pytest -q tests/unit/test_fuzz_readers.py
"""

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import signal
import stat
import struct
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import (HealthCheck, currently_in_test_context, event, given, settings,
                        strategies as st)
from safetensors.numpy import save as st_save

from helpers import digest
from mpigpt2 import report
from mpigpt2.base.errors import UserError
from mpigpt2.formats import checkpoint, hf, models
from mpigpt2.formats.llmc import (HEADER_BYTES, VERSION_BF16, VERSION_FP32, VERSION_FP64,
                                  header_ints, load_params, read_header)
from mpigpt2.formats.shards import MAGIC as SHARD_MAGIC, read_shard
from mpigpt2.model.config import GPTConfig
from mpigpt2.model.params import full_spec, tensor_shapes
from mpigpt2.observe import peak
from mpigpt2.observe.runlog import rows_before

EXAMPLES = int(os.environ.get("MPIGPT2_FUZZ_EXAMPLES", "0") or 0)
ALARM_SECONDS = 20  # a reader that blocks (a FIFO opened) fails instead of hanging the suite


def fuzz(n):
    """Hypothesis settings: n examples (MPIGPT2_FUZZ_EXAMPLES overrides), derandomized, no
    database, no deadline (a 2-core CI machine is slow and noisy)."""
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.large_base_example])


# -- the checks every example makes ------------------------------------------------------------

class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds=ALARM_SECONDS):
    def ring(signum, frame):
        raise Hang(f"a reader blocked for {seconds}s (a FIFO opened?)")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(e):
    msg = str(e)
    assert msg.strip(), f"empty {type(e).__name__} message"
    assert "\n" not in msg and len(msg.splitlines()) == 1, f"not one line: {msg!r}"
    msg.encode("utf-8")  # (a lone surrogate would make the CLI's print fail)
    return msg


def outcome(fn, *roots):
    """fn()'s result, or the UserError it raised (checked to be one line); any other
    exception propagates (hypothesis reports it). The files under roots must not change."""
    before = [digest(r) for r in roots]
    try:
        with alarm():
            result = fn()
    except UserError as e:
        one_line(e)
        result = e
    assert [digest(r) for r in roots] == before, "a reader changed a file on disk"
    if currently_in_test_context():  # the split shows with --hypothesis-show-statistics
        event("refused" if isinstance(result, UserError) else "accepted")
    return result


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def case(scratch):
    """A fresh directory for one example, removed afterwards."""
    d = tempfile.mkdtemp(dir=scratch)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- strategies --------------------------------------------------------------------------------

INTS = st.one_of(st.integers(-2**31, 2**31 - 1),
                 st.sampled_from([0, 1, -1, 2, 3, 4, 5, 8, 16, 64, 128, 4096, 4097, 1 << 22,
                                  (1 << 22) + 1, 2**31 - 1, -2**31]))
DEEP = "\x00deep\x00"  # a JSON string replaced by 5000 nested lists after serialising
HUGE = "\x00huge\x00"  # ... by an integer of 5000 digits (beyond Python's int parsing limit)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.integers(),
                    st.sampled_from([10**30, -10**30, 10**400, 2**64, 2**63, 1e308]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["nan", "x", "", "F32", "\n", "a\u2028b", "$\\frac$", DEEP,
                                     HUGE]))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) |
                    st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)


def dumps(doc):
    """JSON text, with the DEEP/HUGE markers expanded (NaN and Infinity allowed: Python's json
    reads them, so a reader meets them)."""
    text = json.dumps(doc, allow_nan=True)
    return (text.replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000)
            .replace(json.dumps(HUGE), "7" * 5000))


@st.composite
def json_edit(draw, doc):
    """doc after 1-3 edits at random places: a value replaced, a key deleted or added, an
    item appended; now and then the whole document replaced by random JSON."""
    if draw(st.integers(0, 11)) == 0:
        return draw(JSON)
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        parent = doc
        while True:  # walk down a random path
            keys = sorted(parent) if isinstance(parent, dict) else list(range(len(parent)))
            if not keys:
                break
            child = parent[draw(st.sampled_from(keys))]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                parent = child
                continue
            break
        if not isinstance(parent, (dict, list)):
            break
        keys = sorted(parent) if isinstance(parent, dict) else list(range(len(parent)))
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if op == "add" or not keys:
            if isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(JSON)
            else:
                parent.append(draw(JSON))
        elif op == "delete":
            del parent[draw(st.sampled_from(keys))]
        else:
            parent[draw(st.sampled_from(keys))] = draw(JSON)
    return doc


@st.composite
def mutated(draw, seed, fields=0):
    """seed after 1-3 mutations: byte flips, truncation, extension, and (with fields) one of
    the first `fields` little-endian int32 header fields replaced by a random int."""
    data = bytearray(seed)
    kinds = ["flip", "truncate", "extend"] + ["field"] * (2 if fields else 0)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        if kind == "flip" and data:
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif kind == "field" and len(data) >= 4 * fields:
            i = draw(st.integers(0, fields - 1))
            data[4 * i:4 * i + 4] = struct.pack("<i", draw(INTS))
    return bytes(data)


def any_bytes(seed, fields=0):
    return st.one_of(mutated(seed, fields), mutated(seed, fields),
                     st.binary(max_size=min(2 * len(seed), 4096)))


# -- seeds: small real files, built in memory ----------------------------------------------------

CFG = GPTConfig(max_seq_len=8, vocab_size=10, padded_vocab_size=128, num_layers=1, num_heads=1,
                channels=4)


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32)
            for n, s in tensor_shapes(cfg, cfg.num_layers).items()}


PARAMS = random_params(CFG)
PARAMS["wte"][CFG.vocab_size:] = 0.0  # llm.c's padding rows (HF files do not hold them)


def model_bytes(cfg, params, version=VERSION_FP32):
    dt = {VERSION_FP32: "<f4", VERSION_FP64: "<f8"}.get(version)
    body = b"".join(
        (np.asarray(params[n], "<f4").view("<u4") >> 16).astype("<u2").tobytes()
        if version == VERSION_BF16 else np.asarray(params[n], dt).tobytes()
        for n in tensor_shapes(cfg, cfg.num_layers))
    return header_ints(cfg, version).tobytes() + body


MODEL = model_bytes(CFG, PARAMS)
MODEL_BF16 = model_bytes(CFG, PARAMS, VERSION_BF16)
HF_TENSORS = hf.hf_tensors(CFG, PARAMS)
SAFE = st_save(HF_TENSORS, metadata={"format": "pt"})
SAFE_HEADER_LEN = struct.unpack("<Q", SAFE[:8])[0]
SAFE_HEADER = json.loads(SAFE[8:8 + SAFE_HEADER_LEN])
SAFE_BODY = SAFE[8 + SAFE_HEADER_LEN:]
CONFIG = hf.config_dict(CFG)
SHARD_NAMES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
_names = sorted(HF_TENSORS)
SHARDS = [{n: HF_TENSORS[n] for n in _names[0::2]}, {n: HF_TENSORS[n] for n in _names[1::2]}]
INDEX = {"metadata": {"total_size": 0},
         "weight_map": {n: SHARD_NAMES[i] for i, part in enumerate(SHARDS) for n in part}}


def shard_bytes(tokens, magic=SHARD_MAGIC, version=1, count=None):
    h = np.zeros(256, "<i4")
    h[:3] = magic, version, len(tokens) if count is None else count
    return h.tobytes() + np.asarray(tokens, "<u2").tobytes()


SHARD = shard_bytes(np.arange(100) % 60)


def write_hf_dir(d, weights=SAFE, config=None):
    d.mkdir(exist_ok=True)
    (d / "model.safetensors").write_bytes(weights)
    (d / "config.json").write_text(dumps(CONFIG) if config is None else config)
    return d


# -- llm.c model files ---------------------------------------------------------------------------

@st.composite
def consistent_model(draw):
    """A header of a random small shape (maybe invalid) with exactly the bytes it implies: the
    reader gets past the size check into load_params."""
    C = draw(st.integers(1, 8))
    vals = dict(maxT=draw(st.integers(-1, 8)), V=draw(st.integers(-1, 20)),
                L=draw(st.integers(-1, 3)), NH=draw(st.sampled_from([1, 2, 3, C, 0])), C=C,
                Vp=draw(st.integers(-1, 24)))
    version = draw(st.sampled_from([VERSION_FP32, VERSION_BF16, VERSION_FP64, 4]))
    h = np.zeros(256, "<i4")
    h[:8] = [20240326, version, vals["maxT"], vals["V"], vals["L"], vals["NH"], vals["C"],
             vals["Vp"]]
    try:
        cfg = GPTConfig(max_seq_len=vals["maxT"], vocab_size=vals["V"],
                        padded_vocab_size=vals["Vp"], num_layers=vals["L"],
                        num_heads=vals["NH"], channels=C)
        n = sum(int(np.prod(s)) for s in tensor_shapes(cfg, cfg.num_layers).values())
    except UserError:
        n = draw(st.integers(0, 64))
    width = {VERSION_FP32: 4, VERSION_BF16: 2, VERSION_FP64: 8}.get(version, 4)
    return h.tobytes() + draw(st.binary(min_size=n * width, max_size=n * width))


@fuzz(80)
@given(data=st.one_of(any_bytes(MODEL, fields=8), any_bytes(MODEL_BF16, fields=8),
                      consistent_model()),
       fp64=st.booleans())
def test_llmc_model_file(scratch, data, fp64):
    with case(scratch) as d:
        path = str(d / "m.bin")
        Path(path).write_bytes(data)

        def read():
            cfg, version = read_header(path, allow_fp64=fp64)
            assert cfg.padded_vocab_size >= cfg.vocab_size
            if version != VERSION_FP64:
                assert models.load_config(path) == cfg
            tensors = {n: np.empty(s, np.float32)
                       for n, s in tensor_shapes(cfg, cfg.num_layers).items()}
            assert load_params(path, full_spec(cfg), tensors, allow_fp64=fp64) == cfg
            return cfg

        got = outcome(read, d)
        if data == MODEL:
            assert got == CFG


# -- token shards ---------------------------------------------------------------------------------

@fuzz(80)
@given(data=any_bytes(SHARD, fields=3), vocab=st.sampled_from([None, 1, 50, 60, 65536]))
def test_token_shard(scratch, data, vocab):
    with case(scratch) as d:
        path = d / "s.bin"
        path.write_bytes(data)

        def read():
            tokens = read_shard(path, vocab_size=vocab)
            assert tokens.dtype == np.uint16
            assert len(data) == HEADER_BYTES + 2 * len(tokens)
            if vocab is not None and len(tokens):
                assert int(tokens.max()) < vocab
            return len(tokens)

        outcome(read, d)


# -- safetensors headers --------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "U16", "BOOL", "F8_E4M3",
          "F8_E5M2", "C64", "F4", "E8M0", "X", "", "f32", "F\n32", 5, None, ["F32"]]


@st.composite
def safetensors_file(draw):
    """A safetensors file whose JSON header was edited: dtypes, shapes, offsets (out of range,
    overlapping, swapped), names, metadata; the length prefix and the body changed too."""
    header = copy.deepcopy(SAFE_HEADER)
    names = [n for n in header if n != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "offsets", "delete", "overlap",
                                   "swap", "rename", "metadata", "tensor_json", "random"]))
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if op == "random":
            header = draw(JSON)
            break
        if not isinstance(entry, dict):
            continue
        if op == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES))
        elif op == "shape":
            entry["shape"] = draw(st.one_of(st.lists(INTS, max_size=3), JSON,
                                            st.lists(st.integers(0, 2**64), max_size=3)))
        elif op == "offsets":
            size = len(SAFE_BODY)
            bound = st.one_of(st.integers(0, size + 8), INTS, st.sampled_from([2**64 - 1, 2**63,
                                                                               -1, size]))
            entry["data_offsets"] = draw(st.one_of(st.lists(bound, min_size=2, max_size=2),
                                                   st.lists(bound, max_size=3), JSON))
        elif op == "delete":
            header.pop(name, None)
        elif op == "overlap":  # a second name for the same bytes
            header[draw(st.text(max_size=6))] = copy.deepcopy(entry)
        elif op == "swap":
            other = header.get(draw(st.sampled_from(names)))
            if isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = \
                    other.get("data_offsets"), entry.get("data_offsets")
        elif op == "rename":
            header[draw(st.one_of(st.text(max_size=12), st.sampled_from(
                ["transformer.h.0.attn.bias", "lm_head.weight", "wte.weight", "a\nb"])))] = \
                header.pop(name)
        elif op == "metadata":
            header["__metadata__"] = draw(JSON)
        elif op == "tensor_json":
            header[name] = draw(json_edit(entry))
    text = dumps(header).encode("utf-8")
    body = draw(st.sampled_from(["same", "same", "cut", "longer"]))
    data = SAFE_BODY
    if body == "cut":
        data = data[:draw(st.integers(0, len(data)))]
    elif body == "longer":
        data += draw(st.binary(min_size=1, max_size=16))
    n = draw(st.one_of(st.just(len(text)), st.just(len(text)), st.sampled_from(
        [0, 1, len(text) - 1, len(text) + 1, 2**63, 2**64 - 1, 100_000_001]),
        st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", n) + text + data


def check_checkpoint(src, d):
    def read():
        ck = hf.Checkpoint(str(src))
        tensors = ck.load_all()
        assert set(tensors) == set(PARAMS)
        return ck
    return outcome(read, d)


@fuzz(120)
@given(data=st.one_of(safetensors_file(), safetensors_file(), any_bytes(SAFE)),
       single=st.booleans())
def test_safetensors_header(scratch, data, single):
    with case(scratch) as d:
        m = write_hf_dir(d / "m", weights=data)
        check_checkpoint(m / "model.safetensors" if single else m, d)


def test_safetensors_seed_loads(scratch):
    with case(scratch) as d:
        ck = check_checkpoint(write_hf_dir(d / "m"), d)
        assert not isinstance(ck, UserError), ck
        np.testing.assert_array_equal(ck.load_all()["wte"], PARAMS["wte"])


# -- model.safetensors.index.json -----------------------------------------------------------------

ENTRIES = SHARD_NAMES + [
    "../secret.safetensors", "/etc/passwd", "../../../../etc/passwd", "sub/../../x.safetensors",
    "./model-00001-of-00002.safetensors", "./x/../../secret.safetensors",
    "..\\secret.safetensors", "file:///etc/passwd", "file:../secret.safetensors",
    "\\\\server\\share\\x", "C:\\x.safetensors", "model\x00.safetensors", ".", "..", "", "/",
    "~", "~/secret.safetensors", "%2e%2e%2fsecret.safetensors", "sub/x.safetensors",
    "link_in.safetensors", "link_out.safetensors", "link_dir.safetensors", "fifo.safetensors",
    "missing.safetensors", "config.json", "model.safetensors.index.json", "sub",
    "model-00001-of-00002.safetensors\n", " model-00001-of-00002.safetensors"]


@st.composite
def index_doc(draw):
    kind = draw(st.sampled_from(["values", "values", "edit", "random", "bytes"]))
    if kind == "random":
        return dumps(draw(JSON)).encode()
    if kind == "bytes":
        return draw(mutated(dumps(INDEX).encode()))
    doc = copy.deepcopy(INDEX)
    if kind == "edit":
        doc = draw(json_edit(doc))
    else:
        wm = doc["weight_map"]
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.one_of(st.sampled_from(sorted(wm)), st.text(max_size=6)))
            wm[key] = draw(st.one_of(st.sampled_from(ENTRIES), st.sampled_from(ENTRIES),
                                     st.text(max_size=24), JSON))
    return dumps(doc).encode()


def sharded_dir(root):
    """root/secret.safetensors (a complete model, outside) and root/m: two shards, an index,
    config.json, a symlink to a shard, a symlink out, a symlink to a directory, a FIFO."""
    (root / "secret.safetensors").write_bytes(SAFE)  # loads fine if traversal were allowed
    m = root / "m"
    m.mkdir()
    (m / "sub").mkdir()
    (m / "sub" / "x.safetensors").write_bytes(SAFE)
    for name, part in zip(SHARD_NAMES, SHARDS):
        (m / name).write_bytes(st_save(part, metadata={"format": "pt"}))
    (m / "config.json").write_text(dumps(CONFIG))
    os.symlink(SHARD_NAMES[0], m / "link_in.safetensors")
    os.symlink("../secret.safetensors", m / "link_out.safetensors")
    os.symlink("sub", m / "link_dir.safetensors")
    os.mkfifo(m / "fifo.safetensors")
    return m


@fuzz(120)
@given(index=index_doc())
def test_safetensors_index(scratch, index):
    with case(scratch) as d:
        m = sharded_dir(d)
        (m / hf.INDEX).write_bytes(index)
        ck = check_checkpoint(m, d)
        if not isinstance(ck, UserError):  # every file read is a regular file inside m
            for f in ck.files:
                real = os.path.realpath(f)
                assert os.path.dirname(real) == os.path.realpath(m), (f, real)
                assert stat.S_ISREG(os.stat(real).st_mode)


def test_index_seed_loads(scratch):
    with case(scratch) as d:
        m = sharded_dir(d)
        (m / hf.INDEX).write_text(dumps(INDEX))
        ck = check_checkpoint(m, d)
        assert not isinstance(ck, UserError), ck
        assert sorted(os.path.basename(f) for f in ck.files) == SHARD_NAMES


# -- config.json of a Hugging Face directory ------------------------------------------------------

KNOWN_KEYS = sorted(CONFIG) + ["n_ctx", "model_type", "n_inner", "layer_norm_epsilon"]


@st.composite
def config_text(draw):
    kind = draw(st.sampled_from(["field", "field", "edit", "bytes", "random"]))
    if kind == "bytes":
        return draw(mutated(dumps(CONFIG).encode())).decode("utf-8", "surrogateescape")
    if kind == "random":
        return dumps(draw(JSON))
    doc = copy.deepcopy(CONFIG)
    if kind == "edit":
        doc = draw(json_edit(doc))
    else:
        for _ in range(draw(st.integers(1, 3))):
            key = draw(st.sampled_from(KNOWN_KEYS))
            if draw(st.integers(0, 4)) == 0:
                doc.pop(key, None)
            else:
                doc[key] = draw(st.one_of(JSON, INTS, st.sampled_from(
                    [1e-5, 1e-6, True, 0, 4 * CFG.channels, 4097, 1 << 23, 10**30])))
    return dumps(doc)


@fuzz(100)
@given(text=config_text())
def test_hf_config(scratch, text):
    with case(scratch) as d:
        m = d / "m"
        m.mkdir()
        (m / "model.safetensors").write_bytes(SAFE)
        (m / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        outcome(lambda: hf.read_config(str(m / "config.json")), d)
        check_checkpoint(m, d)


# -- state.json of a checkpoint (the reader is checkpoint.read_state: not this module's files;
#    failures found here are reported to its owner, not worked around) -------------------------

STATE = {"model": CFG.as_dict(), "dtype": "float32", "batch_size": 2, "seq_len": 8, "seed": 0,
         "layout": {"pp": 1, "dp": 1, "stage_layers": [1], "microbatches": 1, "slice_tokens": 8,
                    "schedule": "gpipe"},
         "args": {"lr": 1e-4}, "lineage": [["0123456789abcdef", 0]],
         "data": {"train": [["train.bin", 1224]], "loader": {"epoch": 0, "shard": 0,
                                                            "position": 0}}}


@pytest.fixture(scope="module")
def real_checkpoint(scratch):
    root = scratch / "ckpt"
    rng = np.random.default_rng(1)
    moments = {n: rng.random(a.shape).astype(np.float32) for n, a in PARAMS.items()}
    path = checkpoint.write(str(root), 3, CFG, PARAMS, moments, moments, STATE, keep=0,
                            fp64=False)
    checkpoint.read_state(path)  # the seed itself is valid
    return Path(path)


@fuzz(80)
@given(data=st.data())
def test_checkpoint_state(scratch, real_checkpoint, data):
    state = json.loads((real_checkpoint / "state.json").read_text())
    kind = data.draw(st.sampled_from(["edit", "edit", "edit", "bytes"]), label="kind")
    if kind == "edit":
        text = dumps(data.draw(json_edit(state), label="state")).encode("utf-8",
                                                                         "surrogatepass")
    else:
        text = data.draw(mutated((real_checkpoint / "state.json").read_bytes()), label="bytes")
    fix_done = data.draw(st.booleans(), label="DONE rewritten to match")
    with case(scratch) as d:
        ck = d / real_checkpoint.name
        shutil.copytree(real_checkpoint, ck)
        (ck / "state.json").write_bytes(text)
        if fix_done:  # as a careful hand edit would: DONE's step and sha256 follow state.json
            try:
                step = json.loads(text).get("step")
            except (ValueError, AttributeError, RecursionError):
                step = 3
            (ck / checkpoint.DONE).write_text(
                f"{step} {hashlib.sha256(text).hexdigest()}\n")
        outcome(lambda: checkpoint.read_state(str(ck)), d)


# -- metrics.jsonl ---------------------------------------------------------------------------------

STEP_ROW = {"step": 0, "loss": 4.5, "lr": 1e-4, "grad_norm": 1.0, "step_ms": 100.0,
            "tokens_per_s": 640.0, "tokens_per_s_per_core": 640.0, "mfu": 0.01,
            "phases_ms": [{"rank": 0, "stage": 0, "forward": 1.0}], "bubble": 0.0,
            "bubble_predicted": 0.0}
VAL_ROW = {"step": 1, "val_loss": 4.4}
SUMMARY = {"summary": True, "run": {"steps": 2}, "ranks": []}


@st.composite
def metrics_line(draw):
    kind = draw(st.sampled_from(["step", "step", "val", "summary", "edit", "json", "bytes",
                                 "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "deep":
        return b"[" * 5000
    if kind == "json":
        return dumps(draw(JSON)).encode()
    row = dict(STEP_ROW if kind in ("step", "edit") else VAL_ROW if kind == "val" else SUMMARY)
    if "step" in row:
        row["step"] = draw(st.integers(0, 9))
    if kind == "edit":
        row = draw(json_edit(row))
    return dumps(row).encode("utf-8", "surrogatepass")


@st.composite
def metrics_file(draw):
    lines = draw(st.lists(metrics_line(), max_size=8))
    data = b"\n".join(lines)
    if lines and draw(st.booleans()):
        data += b"\n"
    if draw(st.integers(0, 3)) == 0:  # a run killed mid-write: a torn last row
        row = dumps(dict(STEP_ROW, step=9)).encode()
        data += row[:draw(st.integers(1, len(row) - 1))]
    return data


@fuzz(100)
@given(data=metrics_file(), step=st.integers(0, 10))
def test_metrics_rows_before(scratch, data, step):
    # runlog.rows_before is not this module's reader: a failure here is reported to its owner
    with case(scratch) as d:
        path = d / "metrics.jsonl"
        path.write_bytes(data)
        rows = outcome(lambda: rows_before(str(path), step), d)
        if not isinstance(rows, UserError):
            assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in rows)


def check_metrics(steps, vals):
    for r in steps:
        assert isinstance(r["step"], int) and 0 <= r["step"] < 2**53
        assert isinstance(r["loss"], float) and isinstance(r["tokens_per_s"], float)
    for r in vals:
        assert isinstance(r["step"], int) and isinstance(r["val_loss"], float)


@fuzz(150)
@given(data=metrics_file())
def test_report_reads_metrics(scratch, data):
    with case(scratch) as d:
        (d / "metrics.jsonl").write_bytes(data)
        got = outcome(lambda: report.read_metrics(str(d), []), d)
        if not isinstance(got, UserError):
            check_metrics(*got)


# -- trace.json and config.json as report reads them -----------------------------------------------

def trace_doc(ranks=2, steps=2):
    """A trace shaped like the one mpigpt2.train --trace writes."""
    events = []
    for r in range(ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                       "args": {"name": f"rank {r} (stage {r}, replica 0)"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": r,
                       "args": {"sort_index": r}})
        t = 0.0
        for s in range(steps):
            for name, cat, dur in (("F0.0", "forward", 900.0), ("send", "send", 0),
                                   ("wait", "wait", 300.0), ("B0.0", "backward", 1800.0),
                                   ("allreduce", "allreduce", 200.0),
                                   ("update", "update", 100.0)):
                e = {"name": name, "cat": cat, "ph": "i" if cat == "send" else "X", "pid": 0,
                     "tid": r, "ts": t, "args": {"step": s}}
                if e["ph"] == "X":
                    e["dur"] = dur
                else:
                    e["s"] = "t"
                events.append(e)
                t += dur + 10.0
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "metadata": {"layout": {"pp": ranks, "dp": 1, "stage_layers": [1] * ranks,
                                    "microbatches": 1, "slice_tokens": 8,
                                    "schedule": "1f1b"}}}


TRACE = trace_doc()
RUN_CONFIG = {"model": CFG.as_dict(), "layout": TRACE["metadata"]["layout"], "world": 2,
              "args": {"seq_len": 32, "batch_size": 4}}


def json_file(doc):
    return st.one_of(json_edit(doc).map(lambda x: dumps(x).encode("utf-8", "surrogatepass")),
                     json_edit(doc).map(lambda x: dumps(x).encode("utf-8", "surrogatepass")),
                     mutated(dumps(doc).encode()), JSON.map(lambda x: dumps(x).encode()))


@fuzz(120)
@given(data=json_file(TRACE), step=st.one_of(st.none(), st.integers(-2, 3)))
def test_report_reads_trace(scratch, data, step):
    with case(scratch) as d:
        path = d / "trace.json"
        path.write_bytes(data)

        def read():
            trace = report.read_trace(str(path))
            return trace, report.choose_step(trace, step)

        got = outcome(read, d)
        if not isinstance(got, UserError):
            trace, chosen = got
            for e in trace["events"]:
                assert math.isfinite(e["ts"]) and math.isfinite(e["dur"]) and e["dur"] >= 0
            assert report.step_events(trace)[chosen]


@fuzz(60)
@given(data=json_file(RUN_CONFIG))
def test_report_reads_config(scratch, data):
    with case(scratch) as d:
        (d / "config.json").write_bytes(data)
        got = outcome(lambda: report.read_config(str(d)), d)
        if not isinstance(got, UserError):
            report.run_labels([str(d)], [got])  # the fields the labels use are there
            report.timeline_title({"layout": None}, 0, [], got, 1.0)


def metrics_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_METRICS = metrics_bytes([dict(STEP_ROW, step=0), dict(STEP_ROW, step=1, loss=4.0),
                              dict(VAL_ROW, step=2), dict(STEP_ROW, step=1), SUMMARY])


@fuzz(20)
@given(metrics=st.one_of(metrics_file(), st.just(GOOD_METRICS), st.just(GOOD_METRICS)),
       trace=st.one_of(st.none(), st.just(dumps(TRACE).encode()), json_file(TRACE)),
       config=st.one_of(st.none(), st.just(dumps(RUN_CONFIG).encode()), json_file(RUN_CONFIG)))
def test_report_end_to_end(scratch, metrics, trace, config):
    """The whole command: it succeeds and writes only its pictures, or fails with one line and
    writes nothing."""
    with case(scratch) as d:
        (d / "metrics.jsonl").write_bytes(metrics)
        for name, data in (("trace.json", trace), ("config.json", config)):
            if data is not None:
                (d / name).write_bytes(data)
        before = digest(d)
        with contextlib.redirect_stdout(open(os.devnull, "w")) as quiet:
            try:
                with alarm(60):
                    rc = report.main([str(d)])
            except UserError as e:
                one_line(e)
                assert digest(d) == before, "a failing report changed a file"
                event("refused")
                return
            finally:
                quiet.close()
        event("drawn" + (" with a timeline" if trace else ""))
        assert rc == 0
        added = {p for p, *_ in digest(d)} - {p for p, *_ in before}
        want = {"loss.png", "throughput.png"} | ({"timeline.png"} if trace else set())
        assert {os.path.basename(p) for p in added} == want
        assert all(x in digest(d) for x in before)  # the inputs are untouched


# -- the peak cache -------------------------------------------------------------------------------

PROBED = 42.0


@st.composite
def cache_entry(draw):
    key = peak.cache_key()
    kind = draw(st.sampled_from(["record", "record", "record", "json", "bytes", "fifo", "dir",
                                 "dangling", "none"]))
    if kind == "record":
        doc = {"key": draw(st.one_of(st.just(key), st.just(key), JSON)),
               "gflops": draw(st.one_of(st.floats(0.01, 1e5), st.floats(0.01, 1e5),
                                        st.integers(1, 10**5), JSON, st.floats(), st.sampled_from(
                   [-5, 0, 1e-9, 12.5, 1e6, 1e7, 10**400, float("nan"), "12", True])))}
        return "file", dumps(draw(st.one_of(st.just(doc), st.just(doc),
                                            json_edit(doc)))).encode()
    if kind == "json":
        return "file", dumps(draw(JSON)).encode()
    if kind == "bytes":
        return "file", draw(st.binary(max_size=64)) + draw(st.sampled_from([b"", b"\xff\xfe"]))
    return kind, None


def make_cache(cache, kind, data, d):
    """A cache file of the drawn kind: bytes, a FIFO, a directory or a dangling symlink."""
    if kind == "file":
        cache.write_bytes(data)
    elif kind == "fifo":
        os.mkfifo(cache)
    elif kind == "dir":
        cache.mkdir()
    elif kind == "dangling":
        os.symlink(d / "nowhere", cache)


@fuzz(80)
@given(entry=cache_entry())
def test_peak_cache(scratch, entry):
    kind, data = entry
    key = peak.cache_key()
    with case(scratch) as d:
        cache = d / "mpigpt2" / "peak.json"
        cache.parent.mkdir()
        make_cache(cache, kind, data, d)
        with mock.patch.object(peak, "CACHE", str(cache)), \
                mock.patch.object(peak, "probe_peak_gflops", return_value=PROBED), alarm():
            g, source = peak.peak_gflops_per_core()
        assert peak.plausible(g) and isinstance(g, float)
        event(source.split(" ")[0])
        if source.startswith("cached"):
            doc = json.loads(data)
            assert doc["key"] == key and float(doc["gflops"]) == g and 0 < g < 1e6
        else:
            assert source == "probe" and g == PROBED
            if kind != "dir":  # the cache was replaced by a valid record
                assert cache.is_file() and not cache.is_symlink()
                assert json.loads(cache.read_text()) == {"key": key, "gflops": PROBED}
                assert peak.read_cache(key, str(cache)) == PROBED


# -- the slice-profile cache of --slice-tokens auto (parallel/autotune.py) ---------------------

@st.composite
def slices_cache(draw):
    from mpigpt2.parallel import autotune
    key = "KEY"
    good = {"32": [0.01], "16": [0.006, 0.006], "8": [0.004] * 4}
    kind = draw(st.sampled_from(["record", "record", "json", "bytes", "fifo", "dir"]))
    if kind == "record":
        entry = draw(st.one_of(st.just(good), json_edit(good), JSON))
        return "file", dumps({key: entry}).encode(), autotune
    if kind == "json":
        return "file", dumps(draw(JSON)).encode(), autotune
    if kind == "bytes":
        return "file", draw(st.binary(max_size=64)), autotune
    return kind, None, autotune


@fuzz(80)
@given(entry=slices_cache())
def test_slice_profile_cache(scratch, entry):
    """A damaged cache entry is measured again, never a traceback; a usable one is used."""
    kind, data, autotune = entry
    with case(scratch) as d:
        cache = d / "slices.json"
        make_cache(cache, kind, data, d)
        measured = {32: [0.02], 16: [0.01] * 2, 8: [0.009] * 4}
        with mock.patch.object(autotune, "cache_path", return_value=str(cache)), \
                mock.patch.object(autotune, "profile_key", return_value="KEY"), \
                mock.patch.object(autotune, "measure", return_value=measured), alarm():
            prof, source = autotune.profile(None, None, 1, 32, 1, 2, ks=[32, 16, 8])
        assert all(v and all(isinstance(t, float) and t > 0 for t in v) for v in prof.values())
        assert source == "measured" and prof == measured or source == "cache"

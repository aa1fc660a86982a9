"""llm.c model files: round trips, bf16, stage-wise loading, and every malformed case."""

import numpy as np
import pytest

from mpigpt2.model.config import GPTConfig
from mpigpt2.base.errors import UserError
from mpigpt2.formats.llmc import (read_header, load_params, write_model, header_ints, HEADER_BYTES,
                          VERSION_BF16)
from mpigpt2.model.gpt import GPT
from mpigpt2.model.params import ParamLayout, StageSpec, PARAM_NAMES, full_spec

CFG = GPTConfig(max_seq_len=16, vocab_size=50, padded_vocab_size=64, num_layers=3,
                num_heads=2, channels=8)


@pytest.fixture
def model_file(tmp_path):
    m = GPT(CFG, seed=3)
    path = tmp_path / "m.bin"
    write_model(str(path), CFG, m.params)
    return path, m


def test_round_trip(model_file):
    path, m = model_file
    cfg, version = read_header(str(path))
    assert cfg == CFG and version == 3
    m2 = GPT(CFG)
    load_params(str(path), full_spec(CFG), m2.params)
    np.testing.assert_array_equal(m.flat, m2.flat)
    raw = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES)  # llm.c order, plain fp32
    np.testing.assert_array_equal(raw[:64 * 8], m.params["wte"].ravel())


def test_stage_loads_its_layers(model_file):
    path, m = model_file
    spec = StageSpec(1, 3, False, True)
    lay = ParamLayout(CFG, spec)
    flat, views = lay.alloc(np.float32)
    load_params(str(path), spec, views)
    assert set(views) == {n for n in PARAM_NAMES if n != "wpe"}
    np.testing.assert_array_equal(views["qkvw"], m.params["qkvw"][1:3])
    np.testing.assert_array_equal(views["lnfw"], m.params["lnfw"])


def test_bf16_read(tmp_path, model_file):
    _, m = model_file
    bits = m.flat.view(np.uint32)
    bf16 = (bits >> 16).astype("<u2")  # truncation: exactly representable after upcast
    path = tmp_path / "bf16.bin"
    path.write_bytes(header_ints(CFG, VERSION_BF16).tobytes() + bf16.tobytes())
    m2 = GPT(CFG)
    load_params(str(path), full_spec(CFG), m2.params)
    np.testing.assert_array_equal(m2.flat.view(np.uint32), bits & 0xFFFF0000)


def corrupt(path, fn):
    data = bytearray(path.read_bytes())
    fn(data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name,mutate,message", [
    ("magic", lambda d: d.__setitem__(slice(0, 4), (1234).to_bytes(4, "little")), "magic"),
    ("version", lambda d: d.__setitem__(slice(4, 8), (7).to_bytes(4, "little")), "version 7"),
    ("truncated", lambda d: d.__delitem__(slice(-4, None)), "truncated"),
    ("trailing", lambda d: d.extend(b"\0" * 8), "longer than its header"),
    ("short header", lambda d: d.__delitem__(slice(100, None)), "truncated"),
    ("zero layers", lambda d: d.__setitem__(slice(16, 20), (0).to_bytes(4, "little")),
     "invalid header"),
    ("heads", lambda d: d.__setitem__(slice(20, 24), (3).to_bytes(4, "little")),
     "invalid header"),
    ("Vp < V", lambda d: d.__setitem__(slice(28, 32), (10).to_bytes(4, "little")),
     "invalid header"),
])
def test_malformed(model_file, name, mutate, message):
    path, _ = model_file
    corrupt(path, mutate)
    with pytest.raises(UserError, match=message) as e:
        read_header(str(path))
    assert str(path) in str(e.value)


def test_missing(tmp_path):
    with pytest.raises(UserError, match="cannot read model file"):
        read_header(str(tmp_path / "nope.bin"))


def test_write_is_atomic(tmp_path, model_file):
    path, m = model_file
    before = path.read_bytes()
    bad = dict(m.params)
    bad["lnfb"] = np.zeros(3)  # wrong shape: the write fails half-way
    with pytest.raises(AssertionError):
        write_model(str(path), CFG, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.bin"]

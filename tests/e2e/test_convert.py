"""Hugging Face GPT-2 <-> llm.c: conversions and --model DIR, with transformers as the oracle."""

import json
import os
import re
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # never download: every model here is built locally
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from helpers import run, TEXT
from mpigpt2.model.config import GPTConfig
from mpigpt2.formats.models import load_model_source, load_stage_params, model_config
from mpigpt2.base.errors import UserError
from mpigpt2.formats.hf import Checkpoint
from mpigpt2.formats.llmc import HEADER_BYTES, read_header, write_model
from mpigpt2.model.gpt import GPT
from mpigpt2.model.params import LAYER_NAMES, ParamLayout, StageSpec, num_parameters
from mpigpt2.formats.shards import write_shard
from mpigpt2.formats.tokenizer import gpt2_encoding

from tolerances import HF_ATOL
PY = sys.executable
SMALL = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=300)  # Vp = 384
T = 32
hf_logging.set_verbosity_error()
torch.set_num_threads(1)


def hf_model(seed, **shape):
    """A random GPT2LMHeadModel whose LayerNorms and biases are not the trivial 1 / 0."""
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
            if name.endswith("wte.weight"):
                p.mul_(5.0)  # larger logits: a stronger test than ~uniform predictions
    return m


def convert(*args):
    return run([PY, "-m", "mpigpt2.convert", *map(str, args)])


def hf_logits_loss(model, window):
    """transformers' logits of window[:, :-1] and its loss (labels shifted inside)."""
    with torch.no_grad():
        ids = torch.as_tensor(window, dtype=torch.long)
        out = model(input_ids=ids, labels=ids)
        logits = model(input_ids=ids[:, :-1]).logits
    return logits.numpy(), float(out.loss)


def ours_logits_loss(cfg, tensors, window):
    m = GPT(cfg)
    for n, v in m.params.items():
        v[...] = tensors[n]
    logits = m.logits(window[:, :-1])  # (B, T, Vp)
    return logits, m.forward(window[:, :-1], window[:, 1:])


@pytest.fixture(scope="module")
def text_tokens():
    return np.array(gpt2_encoding().encode_ordinary(TEXT.read_text()[:20000]))


@pytest.fixture(scope="module")
def window(text_tokens):
    """Two rows of T+1 real tokens, mod the small vocabulary."""
    return (text_tokens[:2 * (T + 1)] % SMALL["vocab_size"]).reshape(2, T + 1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(torch model, its save_pretrained directory)."""
    d = tmp_path_factory.mktemp("hf") / "small"
    m = hf_model(0, **SMALL)
    m.save_pretrained(d, safe_serialization=True)
    return m, d


def compare(label, cfg, tensors, hf, window):
    V = cfg.vocab_size
    logits, loss = ours_logits_loss(cfg, tensors, window)
    ref_logits, ref_loss = hf_logits_loss(hf, window)
    d_logits = float(np.abs(logits[..., :V] - ref_logits).max())
    d_loss = abs(loss - ref_loss)
    print(f"{label}: max |logits diff| {d_logits:.2e}, |loss diff| {d_loss:.2e} "
          f"(loss {loss:.4f}, logits max {np.abs(ref_logits).max():.2f})")
    assert d_logits < HF_ATOL and d_loss < HF_ATOL
    assert not logits[..., V:].any()  # padded vocabulary rows are zero


# -- conversions and --model DIR vs transformers -----------------------------------------------
def test_hf_to_llmc_matches_transformers(small, window, tmp_path):
    hf, d = small
    r = convert("hf-to-llmc", d, tmp_path / "m.bin")
    assert r.returncode == 0, r.stderr
    cfg, version = read_header(str(tmp_path / "m.bin"))
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.num_layers, cfg.channels,
            cfg.max_seq_len, version) == (300, 384, 2, 32, 64, 3)
    _, tensors = load_model_source(str(tmp_path / "m.bin"))
    sd = hf.state_dict()
    np.testing.assert_array_equal(tensors["qkvw"][1], sd["transformer.h.1.attn.c_attn.weight"].T)
    np.testing.assert_array_equal(tensors["wte"][300:], 0.0)
    compare("hf-to-llmc", cfg, tensors, hf, window)


def test_full_vocabulary_real_tokens_match_transformers(text_tokens, tmp_path):
    """GPT-2's own vocabulary (V = 50257, padded to 50304 on the way in) on unmodified
    tinyshakespeare tokens, through the convert CLI."""
    shape = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf = hf_model(1, **shape)
    hf.save_pretrained(tmp_path / "full", safe_serialization=True)
    r = convert("hf-to-llmc", tmp_path / "full", tmp_path / "full.bin")
    assert r.returncode == 0, r.stderr
    cfg, tensors = load_model_source(str(tmp_path / "full.bin"))
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (50257, 50304)
    real = text_tokens[:2 * (T + 1)].reshape(2, T + 1)
    assert real.max() > 1000  # real GPT-2 ids, not folded into a small range
    compare("V=50257", cfg, tensors, hf, real)


@pytest.mark.parametrize("form", ["dir", "safetensors file"])
def test_model_source_matches_transformers(small, window, form):
    hf, d = small
    src = d if form == "dir" else d / "model.safetensors"
    cfg, tensors = load_model_source(str(src))
    assert model_config(str(src)) == cfg
    compare(f"--model {form}", cfg, tensors, hf, window)


def test_stage_loads_its_layers(small):
    _, d = small
    cfg, full = load_model_source(str(d))
    spec = StageSpec(1, 2, False, True)
    _, views = ParamLayout(cfg, spec).alloc(np.float64)
    load_stage_params(str(d), spec, views)
    assert "wpe" not in views
    for n, v in views.items():
        np.testing.assert_array_equal(v, full[n][1:2] if n in LAYER_NAMES else full[n])


def test_name_variants_bf16_fp16_and_shards(small, tmp_path):
    """No `transformer.` prefix with mask buffers and a tied lm_head (OpenAI's upload), half
    precisions (upcast exactly), and a sharded checkpoint all load the same model."""
    _, d = small
    ref = load_file(d / "model.safetensors")
    cfg, want = load_model_source(str(d))
    shutil.copy(d / "config.json", tmp_path / "config.json")

    bare = {k.removeprefix("transformer."): v for k, v in ref.items()}
    bare.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32))
                 for i in range(2)})
    bare["lm_head.weight"] = ref["transformer.wte.weight"]
    save_file(bare, tmp_path / "bare.safetensors")
    for n, v in load_model_source(str(tmp_path / "bare.safetensors"))[1].items():
        np.testing.assert_array_equal(v, want[n])

    from safetensors.torch import save_file as save_torch
    for dt in (torch.bfloat16, torch.float16):
        save_torch({k: torch.from_numpy(v).to(dt) for k, v in ref.items()},
                   str(tmp_path / "half.safetensors"))
        got = load_model_source(str(tmp_path / "half.safetensors"))[1]
        exact = {k: torch.from_numpy(v).to(dt).float().numpy() for k, v in ref.items()}
        np.testing.assert_array_equal(got["wte"][:300], exact["transformer.wte.weight"])
        np.testing.assert_array_equal(got["fcprojw"][1],
                                      exact["transformer.h.1.mlp.c_proj.weight"].T)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(d / "config.json", sharded / "config.json")
    keys = sorted(ref)
    parts = {"model-00001-of-00002.safetensors": keys[:10],
             "model-00002-of-00002.safetensors": keys[10:]}
    for f, ks in parts.items():
        save_file({k: ref[k] for k in ks}, sharded / f, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for n, v in load_model_source(str(sharded))[1].items():
        np.testing.assert_array_equal(v, want[n])


def test_llmc_to_hf_loads_in_transformers(small, window, tmp_path):
    hf, d = small
    assert convert("hf-to-llmc", d, tmp_path / "m.bin").returncode == 0
    r = convert("llmc-to-hf", tmp_path / "m.bin", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "out"]  # no temp left
    got, ref = load_file(tmp_path / "out/model.safetensors"), load_file(d / "model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert back.config.tie_word_embeddings and back.config.activation_function == "gelu_new"
    cfg, tensors = load_model_source(str(tmp_path / "m.bin"))
    compare("llmc-to-hf, transformers from_pretrained", cfg, tensors, back, window)
    # into an existing directory: files replaced, others kept
    (tmp_path / "out/tokenizer.json").write_text("{}")
    assert convert("llmc-to-hf", tmp_path / "m.bin", tmp_path / "out").returncode == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["config.json", "model.safetensors", "tokenizer.json"]


def test_trained_model_exports(small, text_tokens, tmp_path):
    """Train two steps from the HF directory and from its .bin: identical; the result exported
    to HF gives transformers the loss mpigpt2 computes, and llmc -> hf -> llmc is bit-exact."""
    hf, d = small
    write_shard(tmp_path / "train.bin", text_tokens[:4000] % SMALL["vocab_size"])
    assert convert("hf-to-llmc", d, tmp_path / "init.bin").returncode == 0
    saved = {}
    for name, src in (("dir", d), ("bin", tmp_path / "init.bin")):
        r = run([PY, "-m", "mpigpt2.train", "--model", str(src), "--train-data",
                 str(tmp_path / "train.bin"), "--val-data", "", "--batch-size", "2",
                 "--seq-len", "16", "--steps", "2", "--lr", "1e-3", "--sample-tokens", "0",
                 "--out-dir", str(tmp_path / f"out-{name}"), "--save",
                 str(tmp_path / f"{name}.bin")])
        assert r.returncode == 0, r.stderr
        saved[name] = (tmp_path / f"{name}.bin").read_bytes()
    assert saved["dir"] == saved["bin"]
    assert saved["bin"] != (tmp_path / "init.bin").read_bytes()  # it did train

    assert convert("llmc-to-hf", tmp_path / "bin.bin", tmp_path / "trained").returncode == 0
    hf2 = GPT2LMHeadModel.from_pretrained(tmp_path / "trained").eval()
    win = (text_tokens[5000:5000 + 2 * (T + 1)] % SMALL["vocab_size"]).reshape(2, T + 1)
    cfg, tensors = load_model_source(str(tmp_path / "bin.bin"))
    compare("trained in mpigpt2, loaded in transformers", cfg, tensors, hf2, win)
    assert convert("hf-to-llmc", tmp_path / "trained", tmp_path / "again.bin").returncode == 0
    assert (tmp_path / "again.bin").read_bytes() == saved["bin"]


def test_sample_accepts_hf_dir(tmp_path):
    d = tmp_path / "v50257"
    hf_model(1, n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257) \
        .save_pretrained(d, safe_serialization=True)
    assert convert("hf-to-llmc", d, tmp_path / "m.bin").returncode == 0
    outs = []
    for src in (d, tmp_path / "m.bin"):
        r = run([PY, "-m", "mpigpt2.sample", "--model", str(src), "--prompt", "ROMEO:",
                 "--tokens", "6", "--temperature", "0"])
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].startswith("ROMEO:")


def test_gpt2_124m_round_trips_bit_exactly(tmp_path):
    """GPT-2 124M shape (V 50257 padded to 50304): hf -> llmc -> hf gives the same safetensors
    tensors, and llmc -> hf -> llmc the same .bin bytes."""
    hf = hf_model(2)  # GPT2Config() defaults are GPT-2 124M
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    del hf
    for args in (("hf-to-llmc", tmp_path / "hf", tmp_path / "a.bin"),
                 ("llmc-to-hf", tmp_path / "a.bin", tmp_path / "hf2"),
                 ("hf-to-llmc", tmp_path / "hf2", tmp_path / "b.bin")):
        r = convert(*args)
        assert r.returncode == 0, r.stderr
    cfg, _ = read_header(str(tmp_path / "a.bin"))
    assert cfg == GPTConfig()  # the 124M shape, Vp 50304
    assert (tmp_path / "a.bin").stat().st_size == HEADER_BYTES + 4 * num_parameters(cfg)
    ref, got = load_file(tmp_path / "hf/model.safetensors"), load_file(tmp_path /
                                                                       "hf2/model.safetensors")
    assert got.keys() == ref.keys() and len(ref) == 4 + 12 * 12
    for k in ref:
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    del ref, got
    with open(tmp_path / "a.bin", "rb") as a, open(tmp_path / "b.bin", "rb") as b:
        while True:
            x, y = a.read(1 << 24), b.read(1 << 24)
            assert x == y
            if not x:
                break
    shutil.rmtree(tmp_path)  # 2 GB: do not keep it among pytest's last three runs


# -- every malformed input: one line, exit 2, nothing written -----------------------------------
def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, fn):
    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])


def _untie(t):
    t["lm_head.weight"] = t["transformer.wte.weight"] + 1e-3


def _pt_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


BAD_HF = [
    ("missing config", lambda d: (d / "config.json").unlink(), "no config.json"),
    ("activation", lambda d: _edit_config(d, activation_function="relu"),
     "activation_function 'relu' is not supported"),
    ("exact gelu", lambda d: _edit_config(d, activation_function="gelu"),
     "activation_function 'gelu'"),
    ("model type", lambda d: _edit_config(d, model_type="llama"), "not GPT-2"),
    ("eps", lambda d: _edit_config(d, layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    ("inverse layer idx", lambda d: _edit_config(d, scale_attn_by_inverse_layer_idx=True),
     "scale_attn_by_inverse_layer_idx"),
    ("upcast", lambda d: _edit_config(d, reorder_and_upcast_attn=True),
     "reorder_and_upcast_attn"),
    ("cross attention", lambda d: _edit_config(d, add_cross_attention=True),
     "add_cross_attention"),
    ("bad json", lambda d: (d / "config.json").write_text("{"), "not valid JSON"),
    ("vocab mismatch", lambda d: _edit_config(d, vocab_size=301),
     "has shape (300, 32), but"),
    ("positions mismatch", lambda d: _edit_config(d, n_positions=128), "implies (128, 32)"),
    ("too many layers", lambda d: _edit_config(d, n_layer=3),
     "tensor transformer.h.2.ln_1.weight is missing"),
    ("too few layers", lambda d: _edit_config(d, n_layer=1), "unexpected tensor transformer.h.1"),
    ("missing tensor", lambda d: _edit_tensors(d, lambda t: t.pop("transformer.h.1.ln_2.bias")),
     "tensor transformer.h.1.ln_2.bias is missing"),
    ("wrong shape", lambda d: _edit_tensors(d, lambda t: t.update(
        {"transformer.h.0.mlp.c_fc.weight": np.zeros((128, 32), np.float32)})),
     "transformer.h.0.mlp.c_fc.weight has shape (128, 32)"),
    ("int tensor", lambda d: _edit_tensors(d, lambda t: t.update(
        {"transformer.ln_f.bias": np.zeros(32, np.int32)})), "dtype I32"),
    ("truncated", _truncate, "truncated or corrupt"),
    ("untied lm_head", lambda d: _edit_tensors(d, _untie), "differs from"),
    ("untied, no lm_head", lambda d: _edit_config(d, tie_word_embeddings=False),
     "tie_word_embeddings false"),
    ("pytorch only", _pt_only, "pytorch_model.bin but no model.safetensors"),
    ("empty dir", lambda d: shutil.rmtree(d) or d.mkdir(), "no model.safetensors in"),
    ("nonexistent", shutil.rmtree, "does not exist"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_HF, ids=[b[0] for b in BAD_HF])
def test_bad_hf_model(small, tmp_path, name, mutate, message):
    d = tmp_path / "model"
    shutil.copytree(small[1], d)
    mutate(d)
    with pytest.raises(UserError, match=re.escape(message)):
        Checkpoint(str(d))
    r = convert("hf-to-llmc", d, tmp_path / "out.bin")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error:"), r.stderr
    assert message in err[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model"] if d.exists() else [])


def test_bad_model_in_train_and_sample(small, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(small[1], d)
    _edit_config(d, activation_function="relu")
    write_shard(tmp_path / "t.bin", np.arange(1000) % 300)
    for cmd in (["mpigpt2.train", "--train-data", str(tmp_path / "t.bin"), "--steps", "1",
                 "--out-dir", str(tmp_path / "out")], ["mpigpt2.sample"]):
        r = run([PY, "-m", *cmd, "--model", str(d)])
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "activation_function" in err[0], r.stderr
    assert not (tmp_path / "out").exists()
    r = run([PY, "-m", "mpigpt2.train", "--model", str(tmp_path / "nope") + "/"])
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_bad_llmc_side(small, tmp_path):
    _, d = small
    cfg = GPTConfig(max_seq_len=16, vocab_size=50, padded_vocab_size=64, num_layers=1,
                    num_heads=2, channels=8)
    write_model(str(tmp_path / "m.bin"), cfg, GPT(cfg, seed=0).params)
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-8])
    (tmp_path / "file").write_text("x")
    for args, message in [
        (("llmc-to-hf", tmp_path / "trunc.bin", tmp_path / "o"), "truncated"),
        (("llmc-to-hf", tmp_path / "missing.bin", tmp_path / "o"), "cannot read model file"),
        (("llmc-to-hf", d, tmp_path / "o"), "is a Hugging Face model"),
        (("llmc-to-hf", d / "model.safetensors", tmp_path / "o"), "is a Hugging Face model"),
        (("llmc-to-hf", tmp_path / "m.bin", tmp_path / "file"), "not a directory"),
        (("hf-to-llmc", tmp_path / "m.bin", tmp_path / "o.bin"), "looks like an llm.c file"),
        (("hf-to-llmc", d, tmp_path), "is a directory"),
    ]:
        r = convert(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and message in err[0], (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.bin", "trunc.bin"]
    r = convert("llmc-to-hf", tmp_path / "trunc.bin", tmp_path / "o", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    for sub in ("hf-to-llmc", "llmc-to-hf"):
        h = convert(sub, "--help")
        assert h.returncode == 0 and "--debug" in h.stdout


def test_no_torch_at_run_time(small, tmp_path):
    _, d = small
    code = ("import sys; from mpigpt2.convert import hf_to_llmc, llmc_to_hf; "
            f"hf_to_llmc({str(d)!r}, {str(tmp_path / 'm.bin')!r}); "
            f"llmc_to_hf({str(tmp_path / 'm.bin')!r}, {str(tmp_path / 'hf')!r}); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    r = run([PY, "-c", code])
    assert r.returncode == 0, r.stderr

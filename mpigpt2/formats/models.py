"""Where a model comes from: a preset name, an llm.c .bin or a Hugging Face GPT-2 directory /
.safetensors. One dispatch for train, sample and convert."""

import os

import numpy as np

from mpigpt2.formats.hf import Checkpoint
from mpigpt2.formats.llmc import read_header, load_params
from mpigpt2.model.config import preset, PRESETS
from mpigpt2.model.params import full_spec, tensor_shapes


def load_config(model):
    """Model shape from a preset name, an llm.c file header or a Hugging Face GPT-2 model."""
    if model in PRESETS:
        return preset(model)
    if is_hf_source(model):  # a directory or .safetensors (config.json beside it)
        return model_config(model)
    if os.path.exists(model) or model.endswith(".bin"):
        return read_header(model)[0]
    return preset(model)  # raises: unknown preset


def is_hf_source(path):
    """True when path names a Hugging Face model: a directory (or a path ending in /, to say
    "a missing directory" in errors) or a .safetensors file."""
    path = os.fspath(path)
    return os.path.isdir(path) or path.endswith((".safetensors", "/", os.sep))


def model_config(path):
    """Validated GPTConfig of a Hugging Face model or an llm.c .bin (reads no weights, except
    a present lm_head.weight, which must equal wte)."""
    if is_hf_source(path):
        return Checkpoint(path).cfg
    return read_header(path)[0]


def load_stage_params(path, spec, views):
    """Fill a stage's llm.c-named views (layers spec.layers) from either format; return cfg."""
    if is_hf_source(path):
        ckpt = Checkpoint(path)
        ckpt.load_into(views, spec.layers)
        return ckpt.cfg
    return load_params(path, spec, views)


def load_model_source(path):
    """(GPTConfig, llm.c's global float32 tensors, wte padded to Vp) of either format."""
    if is_hf_source(path):
        ckpt = Checkpoint(path)
        return ckpt.cfg, ckpt.load_all()
    cfg, _ = read_header(path)
    tensors = {n: np.empty(s, np.float32) for n, s in tensor_shapes(cfg, cfg.num_layers).items()}
    load_params(path, full_spec(cfg), tensors)
    return cfg, tensors

"""Hugging Face GPT-2 checkpoints (config.json + model.safetensors): validated reads, atomic writes.

HF's GPT-2 keeps its linear layers as Conv1D with weights stored (in, out); llm.c stores (out, in),
so those four matrices are transposed on the way through. wte is tied to lm_head in both. llm.c
pads the vocabulary to Vp (a multiple of 128) with zero rows; HF does not. Only numpy and the
`safetensors` package are used: no torch at run time.
"""

import json
import os
import re
import shutil
import tempfile

import numpy as np

from mpigpt2.model.config import GPTConfig, pad_vocab
from mpigpt2.base.errors import UserError
from mpigpt2.formats.atomic import fsync_dir, fsync_tree, publish_dir
from mpigpt2.model.params import LAYER_NAMES, PARAM_NAMES, tensor_shapes

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints
CONFIG = "config.json"
PREFIX = "transformer."  # GPT2LMHeadModel's; GPT2Model files (and OpenAI's upload) omit it
LM_HEAD = "lm_head.weight"
# llm.c name -> (HF name below the prefix, stored transposed?)
HF_NAMES = {
    "wte": ("wte.weight", False), "wpe": ("wpe.weight", False),
    "ln1w": ("h.{i}.ln_1.weight", False), "ln1b": ("h.{i}.ln_1.bias", False),
    "qkvw": ("h.{i}.attn.c_attn.weight", True), "qkvb": ("h.{i}.attn.c_attn.bias", False),
    "attprojw": ("h.{i}.attn.c_proj.weight", True), "attprojb": ("h.{i}.attn.c_proj.bias", False),
    "ln2w": ("h.{i}.ln_2.weight", False), "ln2b": ("h.{i}.ln_2.bias", False),
    "fcw": ("h.{i}.mlp.c_fc.weight", True), "fcb": ("h.{i}.mlp.c_fc.bias", False),
    "fcprojw": ("h.{i}.mlp.c_proj.weight", True), "fcprojb": ("h.{i}.mlp.c_proj.bias", False),
    "lnfw": ("ln_f.weight", False), "lnfb": ("ln_f.bias", False),
}
BUFFER = re.compile(r"h\.\d+\.attn\.(masked_)?bias$")  # causal-mask buffers of older files
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both are llm.c's tanh approximation
FETCH_HINT = ("e.g. `hf download openai-community/gpt2 config.json "
              "model.safetensors --local-dir gpt2`")


# -- config.json ---------------------------------------------------------------------------------
def read_config(path):
    """GPTConfig from a HF GPT-2 config.json; refuses every option llm.c's math does not have."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UserError(f"no {CONFIG} at {path}: a Hugging Face model needs it next to its "
                        f"weights; download it too ({FETCH_HINT})")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); download it again")
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object; expected a GPT-2 config.json")

    def bad(what):
        return UserError(f"{path}: {what}")

    kind = raw.get("model_type", "gpt2")
    if kind != "gpt2":
        raise bad(f"model_type {kind!r} is not GPT-2; only GPT-2 checkpoints (model_type "
                  f"'gpt2') can be used")
    if "n_positions" not in raw and "n_ctx" in raw:  # very old configs
        raw = dict(raw, n_positions=raw["n_ctx"])
    dims = {}
    for key in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"):
        v = raw.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(f"{key} must be a positive integer, got {v!r}")
        dims[key] = v
    act = raw.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        raise bad(f"activation_function {act!r} is not supported; llm.c's GPT-2 uses the tanh "
                  f"GELU ('gelu_new')")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
        raise bad(f"layer_norm_epsilon {eps!r} is not supported; llm.c's LayerNorm uses 1e-5")
    if raw.get("n_inner") not in (None, 4 * dims["n_embd"]):
        raise bad(f"n_inner {raw['n_inner']!r} is not supported; llm.c's MLP is 4 × n_embd = "
                  f"{4 * dims['n_embd']} wide (use null)")
    if raw.get("scale_attn_weights", True) is not True:
        raise bad("scale_attn_weights false is not supported; llm.c scales attention by "
                  "1/sqrt(head size)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                "add_cross_attention"):
        if raw.get(key, False):
            raise bad(f"{key} true is not supported by llm.c's GPT-2; set it to false only if "
                      f"the model was trained without it")
    if dims["n_embd"] % dims["n_head"]:
        raise bad(f"n_embd {dims['n_embd']} is not divisible by n_head {dims['n_head']}")
    try:
        cfg = GPTConfig(max_seq_len=dims["n_positions"], vocab_size=dims["vocab_size"],
                        padded_vocab_size=pad_vocab(dims["vocab_size"]),
                        num_layers=dims["n_layer"], num_heads=dims["n_head"],
                        channels=dims["n_embd"])
    except UserError as e:
        raise bad(str(e))
    return cfg, raw.get("tie_word_embeddings", True) is not False


def config_dict(cfg):
    """A config.json that transformers' GPT2LMHeadModel loads as llm.c's model."""
    C = cfg.channels
    d = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len,
        "n_ctx": cfg.max_seq_len, "n_embd": C, "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "initializer_range": 0.02, "attn_pdrop": 0.1,
        "embd_pdrop": 0.1, "resid_pdrop": 0.1, "use_cache": True, "dtype": "float32",
    }
    if cfg.vocab_size > 50256:  # GPT-2's <|endoftext|> exists
        d["bos_token_id"] = d["eos_token_id"] = 50256
    return d


# -- reading ---------------------------------------------------------------------------------------
def locate(src):
    """(weight files, config.json path) of a HF model directory or a .safetensors file."""
    src = os.fspath(src)
    if os.path.isdir(src):
        single, index = os.path.join(src, WEIGHTS), os.path.join(src, INDEX)
        if os.path.isfile(single):
            return [single], os.path.join(src, CONFIG)
        if os.path.isfile(index):
            return _index_files(index), os.path.join(src, CONFIG)
        if os.path.exists(os.path.join(src, "pytorch_model.bin")):
            raise UserError(f"{src} holds pytorch_model.bin but no {WEIGHTS}; mpigpt2 reads "
                            f"only safetensors: download {WEIGHTS} ({FETCH_HINT})")
        raise UserError(f"no {WEIGHTS} in {src}; a Hugging Face model directory needs "
                        f"{WEIGHTS} and {CONFIG} ({FETCH_HINT})")
    if not os.path.exists(src):
        raise UserError(f"{src} does not exist; give a Hugging Face model directory (with "
                        f"{CONFIG} and {WEIGHTS}) or a .safetensors file")
    if not src.endswith(".safetensors"):
        raise UserError(f"{src} is neither a Hugging Face model directory nor a .safetensors "
                        f"file")
    return [src], os.path.join(os.path.dirname(os.path.abspath(src)), CONFIG)


def _index_files(index):
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} is not a valid safetensors index ({e}); download it again")
    return [os.path.join(os.path.dirname(index), f) for f in files]


def _header(path):
    """Name -> (dtype, shape) of a safetensors file; the package validates the whole header."""
    from safetensors import safe_open, SafetensorError
    try:
        with safe_open(path, framework="np") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); it is probably "
                        f"truncated or corrupt: download it again")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}")


def _read_bf16(path, name):
    """numpy has no bfloat16: read the raw bits through the header offsets and widen them."""
    with open(path, "rb") as f:
        n = int(np.frombuffer(f.read(8), dtype="<u8")[0])
        meta = json.loads(f.read(n))[name]
    b, e = meta["data_offsets"]
    bits = np.fromfile(path, dtype="<u2", count=(e - b) // 2, offset=8 + n + b)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])


class Checkpoint:
    """A HF GPT-2 checkpoint, validated on open against its config; tensors are read lazily."""

    def __init__(self, src):
        self.src = os.fspath(src)
        self.files, self.config_path = locate(self.src)
        self.cfg, tied = read_config(self.config_path)
        self.where, self.info = {}, {}
        for path in self.files:
            for k, v in _header(path).items():
                self.where[k], self.info[k] = path, v
        self.prefix = "" if "wte.weight" in self.where else PREFIX
        self._check_names()
        self._check_shapes()
        self._check_tied(tied)

    def _file(self, name=None):
        """The file to name in a message about tensor name."""
        return self.where.get(name) or (self.files[0] if len(self.files) == 1 else self.src)

    def _expected(self):
        """HF name -> shape implied by config.json."""
        cfg, L, out = self.cfg, self.cfg.num_layers, {}
        shapes = tensor_shapes(cfg, L)
        for n in PARAM_NAMES:
            hf, transposed = HF_NAMES[n]
            shape = shapes[n][1:] if n in LAYER_NAMES else shapes[n]
            if n == "wte":
                shape = (cfg.vocab_size, cfg.channels)
            shape = shape[::-1] if transposed else shape
            for i in (range(L) if n in LAYER_NAMES else [None]):
                out[self.prefix + hf.format(i=i)] = tuple(shape)
        return out

    def _check_names(self):
        expected = self._expected()
        for name in expected:
            if name not in self.where:
                raise UserError(f"{self._file()}: tensor {name} is missing; a GPT-2 "
                                f"checkpoint with {self.cfg.num_layers} layers ({CONFIG}: "
                                f"n_layer) needs it")
        for name in self.where:
            if name not in expected and name != LM_HEAD and not BUFFER.search(name):
                raise UserError(f"{self._file(name)}: unexpected tensor {name}; this is not a "
                                f"GPT-2 LM checkpoint matching {self.config_path} "
                                f"(n_layer={self.cfg.num_layers})")

    def _check_shapes(self):
        c = self.cfg
        implied = (f"{self.config_path} (n_embd={c.channels}, vocab_size={c.vocab_size}, "
                   f"n_positions={c.max_seq_len})")
        for name, shape in self._expected().items():
            dtype, got = self.info[name]
            if got != shape:
                raise UserError(f"{self._file(name)}: tensor {name} has shape {got}, but "
                                f"{implied} implies {shape}; the config does not belong to "
                                f"these weights")
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise UserError(f"{self._file(name)}: tensor {name} has dtype {dtype}; "
                                f"expected floating point (F32, F16 or BF16)")

    def _check_tied(self, tied):
        if LM_HEAD not in self.where:
            if not tied:
                raise UserError(f"{self.config_path} says tie_word_embeddings false but "
                                f"{self.src} has no {LM_HEAD}; llm.c needs the tied one")
            return
        wte = self.prefix + HF_NAMES["wte"][0]
        if self.info[LM_HEAD][1] != self.info[wte][1] or \
                not np.array_equal(self.get(LM_HEAD), self.get(wte)):
            raise UserError(f"{self._file(LM_HEAD)}: {LM_HEAD} differs from {wte} (an untied "
                            f"output layer); llm.c's GPT-2 ties them, so this model cannot "
                            f"be used")

    def get(self, name):
        """One HF tensor as float32, in HF's layout."""
        from safetensors import safe_open
        path = self.where[name]
        if self.info[name][0] == "BF16":
            return _read_bf16(path, name)
        with safe_open(path, framework="np") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)

    def load_into(self, views, l0=0, l1=None):
        """Fill llm.c-named views (a stage owning layers l0..l1, or the whole model)."""
        l1 = self.cfg.num_layers if l1 is None else l1
        for n, v in views.items():
            hf, transposed = HF_NAMES[n]
            if n in LAYER_NAMES:
                for j, i in enumerate(range(l0, l1)):
                    a = self.get(self.prefix + hf.format(i=i))
                    v[j] = a.T if transposed else a
            elif n == "wte":
                v[:self.cfg.vocab_size] = self.get(self.prefix + hf)
                v[self.cfg.vocab_size:] = 0.0  # llm.c's padding rows
            else:
                v[...] = self.get(self.prefix + hf)
        return views

    def load_all(self):
        """The whole model as llm.c's global float32 tensors (wte padded to Vp)."""
        shapes = tensor_shapes(self.cfg, self.cfg.num_layers)
        return self.load_into({n: np.empty(shapes[n], np.float32) for n in PARAM_NAMES})


# -- writing ---------------------------------------------------------------------------------------
def hf_tensors(cfg, tensors):
    """llm.c's global tensors -> HF GPT2LMHeadModel's (unpadded wte, Conv1D weights (in, out))."""
    out = {}
    for n in PARAM_NAMES:
        hf, transposed = HF_NAMES[n]
        a = np.asarray(tensors[n], dtype=np.float32)
        if n == "wte":
            a = a[:cfg.vocab_size]
        if n in LAYER_NAMES:
            for i in range(cfg.num_layers):
                out[PREFIX + hf.format(i=i)] = np.ascontiguousarray(a[i].T if transposed else a[i])
        else:
            out[PREFIX + hf] = np.ascontiguousarray(a)
    return out


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_checkpoint(out_dir, cfg, tensors):
    """Write model.safetensors + config.json: built in a temp dir beside out_dir, then renamed
    into place (a new out_dir appears whole; in an existing one each file is replaced)."""
    from safetensors.numpy import save_file
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} exists and is not a directory; give a directory for the "
                        f"Hugging Face model")
    parent = os.path.dirname(out_dir)
    mask = _umask()
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as e:
        raise UserError(f"cannot write into {parent}: {e.strerror}")
    try:
        save_file(hf_tensors(cfg, tensors), os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(config_dict(cfg), f, indent=2)
            f.write("\n")
        for name in (WEIGHTS, CONFIG):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if os.path.isdir(out_dir):  # keep what else the user has there; replace our two files
            fsync_tree(tmp)
            for name in (WEIGHTS, CONFIG):  # weights first: config.json never precedes them
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            fsync_dir(out_dir)
            os.rmdir(tmp)
        else:
            publish_dir(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the Hugging Face model {out_dir}: {e.strerror or e}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Hugging Face GPT-2 checkpoints (config.json + model.safetensors): validated reads, atomic writes.

HF's GPT-2 keeps its linear layers as Conv1D with weights stored (in, out); llm.c stores (out, in),
so those four matrices are transposed on the way through. wte is tied to lm_head in both. llm.c
pads the vocabulary to Vp (a multiple of 128) with zero rows; HF does not. Only numpy and the
`safetensors` package are used: no torch at run time.

Every file is checked to be a regular file before it is opened (a FIFO would block open()), and
the files a sharded checkpoint's model.safetensors.index.json names must be plain file names
that resolve to regular files inside the model directory: no path separators, no "." or "..",
no absolute paths, no symlinks pointing out of the directory.
"""

import json
import os
import re
import shutil
import tempfile

import numpy as np

from mpigpt2.model.config import GPTConfig, pad_vocab
from mpigpt2.base.errors import UserError
from mpigpt2.base.files import open_regular, require_regular
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
MAX_JSON_BYTES = 1 << 24  # config.json and the index are a few KB; anything this big is not one
MAX_DIM, MAX_LAYERS = 1 << 22, 4096  # the bounds llm.c's header reader applies too
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _show(v, limit=80):
    """A value taken from a file, fit for a one-line message: printable strings as they are,
    anything else as its (shortened) repr, which escapes newlines and control characters."""
    text = v if isinstance(v, str) and v.isprintable() else repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _quoted(v, limit=120):
    """A string from a file in quotes, as it is when printable (so a path reads as written),
    else as its repr; shortened to limit characters."""
    return _show(f"'{v}'" if isinstance(v, str) and v.isprintable() else repr(v), limit)


def _one_line(text):
    """A library's error text with line breaks and control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _read_json(path, what):
    """The JSON value in a small regular file; UserError for a non-regular, oversized,
    non-UTF-8 or malformed one. A missing file raises FileNotFoundError for the caller."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        with open_regular(path, what) as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_JSON_BYTES:
        raise UserError(f"{path} is larger than {MAX_JSON_BYTES} bytes; not a {what}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({_one_line(e)}); download it again") \
            from None
    except RecursionError:
        raise UserError(f"{path} is not valid JSON (nested too deeply); download it again") \
            from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({_one_line(e)}); download it again") \
            from None


# -- config.json ---------------------------------------------------------------------------------
def read_config(path):
    """GPTConfig from a HF GPT-2 config.json; refuses every option llm.c's math does not have."""
    try:
        raw = _read_json(path, CONFIG)
    except FileNotFoundError:
        raise UserError(f"no {CONFIG} at {path}: a Hugging Face model needs it next to its "
                        f"weights; download it too ({FETCH_HINT})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object; expected a GPT-2 config.json")

    def bad(what):
        return UserError(f"{path}: {what}")

    kind = raw.get("model_type", "gpt2")
    if kind != "gpt2":
        raise bad(f"model_type {_quoted(kind, 40)} is not GPT-2; only GPT-2 checkpoints "
                  f"(model_type 'gpt2') can be used")
    if "n_positions" not in raw and "n_ctx" in raw:  # very old configs
        raw = dict(raw, n_positions=raw["n_ctx"])
    dims = {}
    for key in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"):
        v = raw.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(f"{key} must be a positive integer, got {_show(v)}")
        if v > (MAX_LAYERS if key == "n_layer" else MAX_DIM):
            raise bad(f"{key} {_show(v)} is implausibly large (at most "
                      f"{MAX_LAYERS if key == 'n_layer' else MAX_DIM})")
        dims[key] = v
    act = raw.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in TANH_GELU:
        raise bad(f"activation_function {_quoted(act, 40)} is not supported; llm.c's GPT-2 "
                  f"uses the tanh GELU ('gelu_new')")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if not _near(eps, 1e-5, 1e-12):
        raise bad(f"layer_norm_epsilon {_show(eps)} is not supported; llm.c's LayerNorm uses "
                  f"1e-5")
    n_inner = raw.get("n_inner")
    if n_inner is not None and not _near(n_inner, 4 * dims["n_embd"], 0):
        raise bad(f"n_inner {_show(n_inner)} is not supported; llm.c's MLP is 4 × n_embd = "
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


def _near(v, want, tol):
    """v is a JSON number (not a bool) within tol of want; NaN and huge ints are not."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return abs(float(v) - want) <= tol
    except OverflowError:
        return False


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
        if os.path.lexists(single):
            require_regular(single, "the weights")
            return [single], os.path.join(src, CONFIG)
        if os.path.lexists(index):
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
    require_regular(src, "the weights")
    return [src], os.path.join(os.path.dirname(os.path.abspath(src)), CONFIG)


def _index_files(index):
    """The weight files a model.safetensors.index.json names, each checked to be a plain file
    name resolving to a regular file inside the index's directory."""
    try:
        doc = _read_json(index, "safetensors index")
    except FileNotFoundError:
        raise UserError(f"{index}: no such file (a dangling symlink?); download it again") \
            from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise UserError(f"{index} is not a valid safetensors index (no \"weight_map\" object); "
                        f"download it again")
    if not weight_map:
        raise UserError(f"{index}: weight_map lists no tensors; download it again")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise UserError(f"{index}: weight_map entry {_quoted(name)} is {_show(file)}, not a "
                            f"file name; download it again")
    folder = os.path.dirname(os.path.abspath(index))
    return [_index_entry(index, folder, f) for f in sorted(set(weight_map.values()))]


def _plain_name(name):
    """A bare file name: no directory part, no separator of any platform, not . or .."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and os.sep not in name and (os.altsep is None or os.altsep not in name)
            and "\0" not in name and not os.path.isabs(name)
            and os.path.basename(name) == name and name.isprintable())


def _index_entry(index, folder, name):
    """folder/name, refused unless name is a plain file name and the file it resolves to
    (symlinks followed) is a regular file directly inside folder."""
    bad = f"{index}: weight_map entry {_quoted(name)}"
    if not _plain_name(name):
        raise UserError(f"{bad} is not a plain file name in the model directory; an index "
                        f"may only name files next to it")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(folder):
        raise UserError(f"{bad} resolves to {_show(real, 200)}, outside the model directory "
                        f"{folder}; copy the file itself into the directory")
    if not os.path.exists(real):
        raise UserError(f"{bad}: {path} does not exist; download the missing shard")
    require_regular(real, f"{bad}:")
    return path


def _header(path):
    """Name -> (dtype, shape) of a safetensors file; the package validates the whole header."""
    from safetensors import safe_open, SafetensorError
    require_regular(path, "safetensors file")
    try:
        with safe_open(path, framework="np") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                    for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path} is not a readable safetensors file ({_one_line(e)}); it is "
                        f"probably truncated or corrupt: download it again") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {_one_line(e.strerror or e)}") from None


def _read_bf16(path, name):
    """numpy has no bfloat16: read the raw bits through the header offsets and widen them."""
    try:
        with open_regular(path, "safetensors file") as f:
            n = int(np.frombuffer(f.read(8), dtype="<u8")[0])
            meta = json.loads(f.read(n))[name]
            b, e = meta["data_offsets"]
            count = int(np.prod(meta["shape"], dtype=np.int64))
            if e - b != 2 * count:
                raise ValueError("data_offsets do not match the shape")
            f.seek(8 + n + b)
            bits = np.frombuffer(f.read(e - b), dtype="<u2")
        if bits.size != count:
            raise ValueError("the file ends early")
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
        raise UserError(f"{path}: tensor {_show(name)} cannot be read ({_one_line(e)}); the "
                        f"file changed or is corrupt: download it again") from None


class Checkpoint:
    """A HF GPT-2 checkpoint, validated on open against its config; tensors are read lazily."""

    def __init__(self, src):
        self.src = os.fspath(src)
        self.files, self.config_path = locate(self.src)
        self.cfg, tied = read_config(self.config_path)
        self.where, self.info = {}, {}
        for path in self.files:
            for k, v in _header(path).items():
                if k in self.where:
                    raise UserError(f"{path}: tensor {_show(k)} is also in {self.where[k]}; a "
                                    f"sharded checkpoint holds each tensor once")
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
                raise UserError(f"{self._file(name)}: unexpected tensor {_show(name)}; this is "
                                f"not a GPT-2 LM checkpoint matching {self.config_path} "
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
            if dtype not in FLOAT_DTYPES:
                raise UserError(f"{self._file(name)}: tensor {name} has dtype {_show(dtype)}; "
                                f"expected floating point (F32, F16 or BF16)")

    def _check_tied(self, tied):
        if LM_HEAD not in self.where:
            if not tied:
                raise UserError(f"{self.config_path} says tie_word_embeddings false but "
                                f"{self.src} has no {LM_HEAD}; llm.c needs the tied one")
            return
        wte = self.prefix + HF_NAMES["wte"][0]
        if self.info[LM_HEAD][0] not in FLOAT_DTYPES:
            raise UserError(f"{self._file(LM_HEAD)}: tensor {LM_HEAD} has dtype "
                            f"{_show(self.info[LM_HEAD][0])}; expected floating point (F32, F16 "
                            f"or BF16)")
        if self.info[LM_HEAD][1] != self.info[wte][1] or \
                not np.array_equal(self.get(LM_HEAD), self.get(wte)):
            raise UserError(f"{self._file(LM_HEAD)}: {LM_HEAD} differs from {wte} (an untied "
                            f"output layer); llm.c's GPT-2 ties them, so this model cannot "
                            f"be used")

    def get(self, name):
        """One HF tensor as float32, in HF's layout."""
        from safetensors import safe_open, SafetensorError
        path = self.where[name]
        if self.info[name][0] == "BF16":
            return _read_bf16(path, name)
        require_regular(path, "safetensors file")
        try:
            with safe_open(path, framework="np") as f:
                return np.asarray(f.get_tensor(name), dtype=np.float32)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: tensor {_show(name)} cannot be read ({_one_line(e)}); the "
                            f"file changed or is corrupt: download it again") from None

    def load_into(self, views, layers=None):
        """Fill llm.c-named views (a stage owning the global layers `layers`, or the whole model)."""
        layers = range(self.cfg.num_layers) if layers is None else layers
        for n, v in views.items():
            hf, transposed = HF_NAMES[n]
            if n in LAYER_NAMES:
                for j, i in enumerate(layers):
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

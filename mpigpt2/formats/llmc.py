"""llm.c's model file: 256 int32 header then the 16 tensors in order (fp32 v3; bf16 v5 read)."""

import os

import numpy as np

from mpigpt2.model.config import GPTConfig
from mpigpt2.base.errors import UserError
from mpigpt2.base.files import open_regular
from mpigpt2.formats.atomic import atomic_write
from mpigpt2.model.params import PARAM_NAMES, LAYER_NAMES, tensor_shapes

MODEL_MAGIC = 20240326
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSION_FP32, VERSION_BF16 = 3, 5
VERSION_FP64 = 64  # mpigpt2's own extension, for float64 training state; llm.c never reads it


def read_header(path, allow_fp64=False):
    """Validate the header and file length of an llm.c model file; return (GPTConfig, version)."""
    with _open(path) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(HEADER_BYTES)
        except OSError as e:
            raise UserError(f"cannot read model file {path}: {e.strerror} (check --model)") \
                from None
    if len(raw) < HEADER_BYTES:
        raise UserError(f"model file {path} is truncated: {size} bytes, shorter than the "
                        f"{HEADER_BYTES}-byte llm.c header")
    h = np.frombuffer(raw, dtype="<i4")
    if h[0] != MODEL_MAGIC:
        raise UserError(f"{path} is not an llm.c model file (magic {h[0]}, expected "
                        f"{MODEL_MAGIC}); pass a .bin written by llm.c or mpigpt2, or a preset")
    version = int(h[1])
    if version not in (VERSION_FP32, VERSION_BF16) + ((VERSION_FP64,) if allow_fp64 else ()):
        raise UserError(f"model file {path} has version {version}; supported are 3 (fp32) and "
                        f"5 (bf16) — re-export it with llm.c's current train_gpt2.py")
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    if min(maxT, V, L, NH, C, Vp) <= 0 or C % NH or Vp < V or max(maxT, V, C, Vp) > 1 << 22 \
            or L > 4096:
        raise UserError(f"model file {path} has an invalid header: maxT={maxT} V={V} L={L} "
                        f"NH={NH} C={C} Vp={Vp}")
    cfg = GPTConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=L,
                    num_heads=NH, channels=C)
    n = sum(int(np.prod(s)) for s in tensor_shapes(cfg, L).values())
    expect = HEADER_BYTES + n * {VERSION_FP32: 4, VERSION_BF16: 2, VERSION_FP64: 8}[version]
    if size != expect:
        what = "truncated" if size < expect else "longer than its header says"
        raise UserError(f"model file {path} is {what}: {size} bytes, header (L={L} C={C} "
                        f"Vp={Vp} maxT={maxT}) implies {expect}")
    return cfg, version


def _open(path):
    """The model file opened for reading, after checking it is a regular file (a FIFO or a
    device given as --model would block open() or read forever)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"cannot read model file {path}: no such file (check --model)")
    try:
        return open_regular(path, "model file")
    except UserError as e:
        raise UserError(f"{e} (check --model)") from None


def _tensor_offsets(cfg):
    """Element offset of each global tensor inside the file's parameter block."""
    offs, off = {}, 0
    for n, s in tensor_shapes(cfg, cfg.num_layers).items():
        offs[n] = (off, s)
        off += int(np.prod(s))
    return offs


def load_params(path, spec, views, allow_fp64=False):
    """Copy the tensors a stage owns (layers spec.layers) from an llm.c file into views."""
    cfg, version = read_header(path, allow_fp64)
    dt = {VERSION_FP32: "<f4", VERSION_BF16: "<u2", VERSION_FP64: "<f8"}[version]
    with _open(path) as f:  # the file checked, mapped through the same descriptor
        try:
            raw = np.memmap(f, dtype=dt, mode="r", offset=HEADER_BYTES)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot map model file {path} ({e}); did it change while being "
                            f"read?") from None
    offsets = _tensor_offsets(cfg)
    if raw.size != sum(int(np.prod(shape)) for _, shape in offsets.values()):
        raise UserError(f"model file {path} changed size while being read; read it again")
    for n, (off, shape) in offsets.items():
        if n not in views:
            continue
        full = raw[off:off + int(np.prod(shape))].reshape(shape)
        part = full[list(spec.layers)] if n in LAYER_NAMES else full
        if version == VERSION_BF16:  # bf16 is the top half of an fp32
            views[n][...] = (part.astype(np.uint32) << 16).view(np.float32)
        else:
            views[n][...] = part
    del raw
    return cfg


def header_ints(cfg, version=VERSION_FP32):
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:8] = [MODEL_MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers,
             cfg.num_heads, cfg.channels, cfg.padded_vocab_size]
    return h


def write_model(path, cfg, tensors, fp64=False):
    """Write the global tensors (dict name -> array of the global shape) as an fp32 llm.c file
    (or, with fp64, mpigpt2's float64 variant of it)."""
    shapes = tensor_shapes(cfg, cfg.num_layers)
    dt = "<f8" if fp64 else "<f4"

    def write(f):
        f.write(header_ints(cfg, VERSION_FP64 if fp64 else VERSION_FP32).tobytes())
        for n in PARAM_NAMES:
            a = np.asarray(tensors[n])
            assert a.shape == shapes[n], (n, a.shape, shapes[n])
            f.write(np.ascontiguousarray(a, dtype=dt).tobytes())

    try:
        atomic_write(path, write)
    except OSError as e:
        raise UserError(f"cannot write model file {path}: {e.strerror}")

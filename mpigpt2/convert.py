"""Convert between Hugging Face GPT-2 checkpoints and llm.c .bin files.

    python -m mpigpt2.convert hf-to-llmc MODEL_DIR_OR_SAFETENSORS OUT.bin
    python -m mpigpt2.convert llmc-to-hf IN.bin OUT_DIR

A Hugging Face model is a directory with config.json and model.safetensors (or a .safetensors
file with config.json beside it); `--model` of train and sample accepts one directly
(formats.models loads either format).
"""

import argparse
import os
import sys

from mpigpt2.base.errors import UserError
from mpigpt2.formats.models import is_hf_source, load_model_source


def hf_to_llmc(src, out):
    """Hugging Face GPT-2 (directory or .safetensors) -> llm.c fp32 .bin; returns the cfg."""
    from mpigpt2.formats.hf import Checkpoint
    from mpigpt2.formats.llmc import write_model
    if not is_hf_source(src) and src.endswith(".bin") and os.path.isfile(src):
        raise UserError(f"{src} looks like an llm.c file; hf-to-llmc reads a Hugging Face model "
                        f"directory or .safetensors (use llmc-to-hf to go the other way)")
    if os.path.isdir(out):
        raise UserError(f"output {out} is a directory; give a file name like model.bin")
    ckpt = Checkpoint(src)
    tensors = ckpt.load_all()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the directory of {out}: {e.strerror}")
    write_model(out, ckpt.cfg, tensors)
    return ckpt.cfg


def llmc_to_hf(src, out_dir):
    """llm.c .bin (fp32 or bf16) -> Hugging Face directory (model.safetensors + config.json)."""
    from mpigpt2.formats.hf import write_checkpoint
    if is_hf_source(src):
        raise UserError(f"{src} is a Hugging Face model; llmc-to-hf reads an llm.c .bin file "
                        f"(use hf-to-llmc to convert the other way)")
    cfg, tensors = load_model_source(src)
    write_checkpoint(out_dir, cfg, tensors)
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpigpt2.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{hf-to-llmc,llmc-to-hf}")
    a = sub.add_parser("hf-to-llmc", help="Hugging Face GPT-2 -> llm.c fp32 .bin")
    a.add_argument("src", metavar="MODEL_DIR_OR_SAFETENSORS",
                   help="directory with config.json + model.safetensors, or a .safetensors file "
                        "with config.json beside it")
    a.add_argument("out", metavar="OUT.bin", help="llm.c model file to write (atomically)")
    b = sub.add_parser("llmc-to-hf", help="llm.c .bin -> Hugging Face GPT-2 directory")
    b.add_argument("src", metavar="IN.bin", help="llm.c model file (fp32 v3 or bf16 v5)")
    b.add_argument("out", metavar="OUT_DIR",
                   help="directory to write model.safetensors + config.json into")
    for s in (a, b):
        s.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = p.parse_args(argv)
    if args.command == "hf-to-llmc":
        cfg = hf_to_llmc(args.src, args.out)
    else:
        cfg = llmc_to_hf(args.src, args.out)
    print(f"wrote {args.out}: L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} "
          f"V={cfg.vocab_size} (Vp {cfg.padded_vocab_size}) maxT={cfg.max_seq_len}")
    return 0


if __name__ == "__main__":
    from mpigpt2.base.errors import run_cli
    sys.exit(run_cli(main))

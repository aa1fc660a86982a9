"""Sample a continuation from a model: `python -m mpigpt2.sample --model PATH --prompt TEXT`."""

import argparse
import sys

import numpy as np

from mpigpt2.base.argtypes import check_number
from mpigpt2.base.errors import UserError


def model_from_tensors(cfg, tensors):
    """A one-process GPT holding the given global tensors."""
    from mpigpt2.model.gpt import GPT
    m = GPT(cfg)
    for n, v in m.params.items():
        v[...] = tensors[n]
    return m


def generate(model, prompt, n_tokens, temperature=1.0, top_k=None, seed=0):
    """Autoregressive sampling with the KV prefix cache: each new token is a slice of one."""
    cfg, stage = model.cfg, model.stage
    if not prompt:
        raise UserError("the prompt is empty")
    total = min(cfg.max_seq_len, len(prompt) + n_tokens)
    if len(prompt) >= cfg.max_seq_len:
        raise UserError(f"the prompt has {len(prompt)} tokens; the model's maxT is "
                        f"{cfg.max_seq_len}")
    rng = np.random.default_rng(seed)
    toks = list(prompt)
    stage.begin(-1, 1, cfg.max_seq_len)
    logits = stage.forward(-1, 0, np.array([toks]), train=False)[-1:]  # (1, Vp)
    while len(toks) < total:
        if temperature <= 0:
            nxt = int(np.argmax(logits[0, :cfg.vocab_size]))
        else:
            z = logits[:, :cfg.vocab_size].astype(np.float64) / temperature  # (1, V)
            if top_k and top_k < cfg.vocab_size:
                kth = np.partition(z[0], -top_k)[-top_k]
                z[z < kth] = -np.inf
            from mpigpt2.model.ops import softmax_logits
            probs = softmax_logits(z, cfg.vocab_size)[0]  # (V,)
            nxt = int(rng.choice(cfg.vocab_size, p=probs))
        toks.append(nxt)
        if len(toks) < total:
            logits = stage.forward(-1, len(toks) - 1, np.array([[nxt]]), train=False)  # (1, Vp)
    stage.drop(-1)
    return toks


def start_token(cfg):
    """<|endoftext|> when the vocabulary has it, else token 0 (small test vocabularies)."""
    from mpigpt2.formats.tokenizer import EOT
    return EOT if cfg.vocab_size > EOT else 0


def decode(tokens):
    from mpigpt2.formats.tokenizer import gpt2_encoding
    return gpt2_encoding().decode([t for t in tokens if t < 50257])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mpigpt2.sample", description=__doc__)
    p.add_argument("--model", required=True,
                   help="llm.c .bin model file, or Hugging Face GPT-2 directory / .safetensors")
    p.add_argument("--prompt", default="", help="text to continue (default: <|endoftext|>)")
    p.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--debug", action="store_true", help="show tracebacks for input errors")
    args = p.parse_args(argv)
    if args.tokens < 0 or args.top_k < 0:
        raise UserError("--tokens and --top-k must be ≥ 0")
    check_number("--temperature", args.temperature, 0)
    if args.seed < 0:
        raise UserError(f"--seed must be ≥ 0, got {args.seed}")
    from mpigpt2.formats.models import model_config, load_stage_params
    from mpigpt2.model.gpt import GPT
    from mpigpt2.model.params import full_spec
    from mpigpt2.formats.tokenizer import gpt2_encoding
    cfg = model_config(args.model)  # llm.c .bin or Hugging Face model
    prompt = gpt2_encoding().encode_ordinary(args.prompt) if args.prompt else [start_token(cfg)]
    if max(prompt) >= cfg.vocab_size:
        raise UserError(f"the prompt has token ids ≥ the model's vocabulary {cfg.vocab_size}")
    if len(prompt) >= cfg.max_seq_len:
        raise UserError(f"the prompt alone has {len(prompt)} tokens, the model's maximum "
                        f"sequence length is {cfg.max_seq_len}: shorten --prompt")
    if len(prompt) + args.tokens > cfg.max_seq_len:
        raise UserError(f"the prompt ({len(prompt)} tokens) plus --tokens {args.tokens} exceed "
                        f"the model's maximum sequence length {cfg.max_seq_len}; lower --tokens "
                        f"to {cfg.max_seq_len - len(prompt)} or shorten --prompt")
    model = GPT(cfg)
    load_stage_params(args.model, full_spec(cfg), model.params)
    toks = generate(model, prompt, args.tokens, args.temperature, args.top_k or None, args.seed)
    print(args.prompt + decode(toks[len(prompt):]))
    return 0


if __name__ == "__main__":
    from mpigpt2.base.errors import run_cli
    sys.exit(run_cli(main))

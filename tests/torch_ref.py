"""An independent GPT-2 in PyTorch (autograd), used only as a test oracle."""

import math

import numpy as np
import torch
import torch.nn.functional as F


def to_torch(params, dtype=torch.float64):
    """Leaf tensors (requires_grad) from a dict of numpy arrays."""
    return {n: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=True)
            for n, v in params.items()}


def gpt2_loss(t, tokens, targets, cfg, return_logits=False):
    """Mean cross-entropy of GPT-2 with llm.c's parameter names/shapes (weights (out, in))."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    B, T = tokens.shape
    C, NH, V = cfg.channels, cfg.num_heads, cfg.vocab_size
    hs = C // NH
    x = t["wte"][tokens] + t["wpe"][:T]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(cfg.num_layers):
        h = F.layer_norm(x, (C,), t["ln1w"][i], t["ln1b"][i], eps=1e-5)
        qkv = h @ t["qkvw"][i].T + t["qkvb"][i]
        q, k, v = qkv.split(C, dim=-1)
        q, k, v = (z.view(B, T, NH, hs).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ t["attprojw"][i].T + t["attprojb"][i]
        h = F.layer_norm(x, (C,), t["ln2w"][i], t["ln2b"][i], eps=1e-5)
        h = F.gelu(h @ t["fcw"][i].T + t["fcb"][i], approximate="tanh")
        x = x + h @ t["fcprojw"][i].T + t["fcprojb"][i]
    x = F.layer_norm(x, (C,), t["lnfw"], t["lnfb"], eps=1e-5)
    logits = x @ t["wte"].T
    loss = F.cross_entropy(logits[..., :V].reshape(B * T, V), targets.reshape(-1))
    return (loss, logits) if return_logits else loss

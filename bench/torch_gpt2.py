"""A plain PyTorch GPT-2 (the same math as mpigpt2) used only as the speed baseline."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """LayerNorm → fused qkv → causal SDPA → projection → residual; LayerNorm → MLP (GELU tanh)."""

    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln1 = nn.LayerNorm(C)
        self.qkv = nn.Linear(C, 3 * C)
        self.attproj = nn.Linear(C, C)
        self.ln2 = nn.LayerNorm(C)
        self.fc = nn.Linear(C, 4 * C)
        self.fcproj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.NH
        qkv = self.qkv(self.ln1(x))  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.NH, hs).permute(2, 0, 3, 1, 4).unbind(0)  # (B, NH, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, NH, T, hs)
        x = x + self.attproj(y.transpose(1, 2).reshape(B, T, C))
        x = x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))
        return x


class TorchGPT2(nn.Module):
    """GPT-2 with the lm_head tied to wte over the padded vocabulary Vp.

    head="padded": logits over all Vp rows, cross-entropy over the first V columns (llm.c's way).
    head="sliced": logits only over wte[:V] (a contiguous view; the padded rows get no gradient
    in either form), which spares torch a strided (N, V) copy of the logits.
    """

    def __init__(self, cfg, head="padded", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.V, self.head = cfg.vocab_size, head
        C, L = cfg.channels, cfg.num_layers
        self.wte = nn.Embedding(cfg.padded_vocab_size, C)
        self.wpe = nn.Embedding(cfg.max_seq_len, C)
        self.blocks = nn.ModuleList(Block(C, cfg.num_heads) for _ in range(L))
        self.lnf = nn.LayerNorm(C)
        std_proj = 0.02 / math.sqrt(2 * L)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std_proj if name.endswith("proj.weight") else 0.02)
        with torch.no_grad():
            self.wte.weight[self.V:] = 0.0

    def forward(self, tokens, targets):
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)  # (B, T, C)
        for blk in self.blocks:
            x = blk(x)
        x = self.lnf(x).view(B * T, -1)  # (B*T, C)
        if self.head == "sliced":
            logits = F.linear(x, self.wte.weight[:self.V])  # (B*T, V)
        else:
            logits = F.linear(x, self.wte.weight)[:, :self.V]  # (B*T, Vp) -> view (B*T, V)
        return F.cross_entropy(logits, targets.view(-1))


def make_optimizer(model, lr=1e-4):
    """AdamW as llm.c (eps 1e-8, no weight decay); fused on CPU when this torch supports it.

    Returns (optimizer, kind) with kind "fused" or "foreach (fused failed: ...)".
    """
    kw = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    try:
        opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        return opt, "fused"
    except (RuntimeError, ValueError, TypeError) as e:
        opt = torch.optim.AdamW(model.parameters(), foreach=True, **kw)
        return opt, f"foreach (fused failed: {e})"


def load_from_mpigpt2(model, params):
    """Copy mpigpt2's named tensors (llm.c layout, weights (out, in)) into model, for checks."""
    with torch.no_grad():
        model.wte.weight.copy_(torch.from_numpy(params["wte"]))
        model.wpe.weight.copy_(torch.from_numpy(params["wpe"]))
        model.lnf.weight.copy_(torch.from_numpy(params["lnfw"]))
        model.lnf.bias.copy_(torch.from_numpy(params["lnfb"]))
        for i, blk in enumerate(model.blocks):
            pairs = [(blk.ln1, "ln1"), (blk.ln2, "ln2")]
            for mod, n in pairs:
                mod.weight.copy_(torch.from_numpy(params[n + "w"][i]))
                mod.bias.copy_(torch.from_numpy(params[n + "b"][i]))
            for mod, n in [(blk.qkv, "qkv"), (blk.attproj, "attproj"), (blk.fc, "fc"),
                           (blk.fcproj, "fcproj")]:
                mod.weight.copy_(torch.from_numpy(params[n + "w"][i]))
                mod.bias.copy_(torch.from_numpy(params[n + "b"][i]))

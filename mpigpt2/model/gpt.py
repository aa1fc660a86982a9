"""The whole GPT-2 on one process: a single stage owning every layer."""

import numpy as np

from mpigpt2.model.params import full_spec, init_params
from mpigpt2.model.stage import Stage


class GPT:
    """GPT-2 with llm.c's parameter layout; forward fuses the loss gradient (call backward next)."""

    def __init__(self, cfg, dtype=np.float32, seed=None):
        self.cfg = cfg
        self.stage = Stage(cfg, full_spec(cfg), dtype)
        self.params = self.stage.p
        if seed is not None:
            init_params(cfg, self.stage.spec, self.params, seed)
        self._pending = None

    @property
    def flat(self):
        return self.stage.flat

    @property
    def grads(self):
        return self.stage.g

    @property
    def grad_flat(self):
        return self.stage.grad_flat

    def forward(self, tokens, targets, slice_tokens=None):
        """Mean cross-entropy of tokens/targets (B, T); keeps activations for backward."""
        B, T = tokens.shape
        k = slice_tokens or T
        assert T % k == 0
        self.stage.drop(0)
        self.stage.begin(0, B, T)
        total = 0.0
        for pos0 in range(0, T, k):
            losses = self.stage.forward(0, pos0, tokens[:, pos0:pos0 + k],
                                        targets[:, pos0:pos0 + k], dloss=1.0 / (B * T))
            total += float(losses.sum())
        self._pending = (T, k)
        return total / (B * T)

    def backward(self):
        """Accumulate parameter gradients of the last forward's mean loss into self.grads."""
        T, k = self._pending
        for pos0 in reversed(range(0, T, k)):
            self.stage.backward(0, pos0)
        self._pending = None

    def zero_grad(self):
        self.stage.zero_grad()

    def logits(self, tokens):
        """Logits (B, T, Vp) of tokens (B, T), no training state kept."""
        B, T = tokens.shape
        self.stage.begin(-1, B, T)
        out = self.stage.forward(-1, 0, tokens, train=False)
        self.stage.drop(-1)
        return out.reshape(B, T, -1)

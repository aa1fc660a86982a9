"""AdamW exactly as llm.c's gpt2_update, in place over a flat buffer, plus the lr schedule."""

import functools
import math

import numpy as np


@functools.cache
def _fused_kernel():
    """The update of one element per iteration, compiled once (numba, cached on disk).

    No fastmath: every operation rounds to the array dtype, in the order written (no FMA
    contraction, no reassociation), so the result is that of the same ops done array by array;
    tests/unit/test_optim.py checks the bits. error_model="numpy": IEEE division, no checks.
    (docs/design.md#the-fused-adamw-step)
    """
    from numba import njit

    @njit(cache=True, nogil=True, error_model="numpy", boundscheck=False)
    def adamw_fused(p, g, m, v, s, b1, c1, b2, c2, r2, eps, k, dw, decay):
        for i in range(p.size):
            gi = g[i] * s                              # clipping scale (× 1 is exact)
            mi = m[i] * b1 + gi * c1                   # m = b1*m + (1-b1)*g
            vi = v[i] * b2 + (gi * gi) * c2            # v = b2*v + (1-b2)*g*g
            u = mi / ((np.sqrt(vi * r2) + eps) * k)    # lr * m_hat / (sqrt(v_hat) + eps)
            if decay:
                u = u + p[i] * dw                      # + lr * wd * (old) param
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - u

    return adamw_fused


class AdamW:
    """Bias-corrected AdamW; eps after the sqrt; decoupled weight decay on every parameter.

    One fused pass over the buffers per step. Every scalar is rounded to the array dtype once
    per step, then: m = b1·m + (1−b1)·g; v = b2·v + ((g·g)·(1−b2)); p −= m / ((sqrt(v·(1/bc2))
    + eps) · (bc1/lr)) + (lr·wd)·p, where bc = 1 − β^t and g is pre-multiplied by the clipping
    scale. bc1/lr is lr·m_hat's divisor folded into one number (inf when lr = 0: the moments
    move, the parameters do not).
    """

    def __init__(self, size, dtype, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                 moments=None):
        """moments: (m, v) arrays of `size` to keep the state in (e.g. views of memory shared
        between processes), else fresh zeros."""
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        if moments is None:
            moments = np.zeros(size, dtype=dtype), np.zeros(size, dtype=dtype)
        self.m, self.v = moments  # first and second moment

    def step(self, params, grads, t, lr, grad_scale=1.0):
        """Update params in place from grads (contiguous, same size and dtype as the moments);
        t is the 1-based step count (bias correction)."""
        dt = self.m.dtype.type
        b1, b2, wd = self.beta1, self.beta2, self.weight_decay
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        k = bc1 / lr if lr else np.inf
        for a in (params, grads):
            assert a.dtype == self.m.dtype and a.shape == self.m.shape and a.flags.c_contiguous
        _fused_kernel()(params, grads, self.m, self.v, dt(grad_scale), dt(b1), dt(1.0 - b1),
                        dt(b2), dt(1.0 - b2), dt(1.0 / bc2), dt(self.eps), dt(k), dt(lr * wd),
                        wd != 0.0)

    def state(self):
        return {"m": self.m, "v": self.v}


def lr_at(step, base_lr, total_steps, warmup_steps=0, schedule="constant", min_lr_frac=0.0):
    """Learning rate of 0-based step: linear warm-up, then constant or cosine to min_lr_frac."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    min_lr = base_lr * min_lr_frac
    span = max(1, total_steps - warmup_steps)
    ratio = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - min_lr)


def clip_scale(total_norm, max_norm):
    """Gradient multiplier for global-norm clipping (1 when off or under the limit)."""
    if not max_norm or max_norm <= 0 or total_norm <= max_norm:
        return 1.0
    return max_norm / (total_norm + 1e-6)

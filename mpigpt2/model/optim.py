"""AdamW exactly as llm.c's gpt2_update, in place over a flat buffer, plus the lr schedule."""

import math

import numpy as np

CHUNK = 1 << 15  # elements per pass; keeps the ~8 passes over a chunk inside the L2 cache


class AdamW:
    """Bias-corrected AdamW; eps after the sqrt; decoupled weight decay on every parameter."""

    def __init__(self, size, dtype, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = np.zeros(size, dtype=dtype)  # first moment
        self.v = np.zeros(size, dtype=dtype)  # second moment
        self._tmp = np.empty(min(size, CHUNK), dtype=dtype)
        self._tmp2 = np.empty(min(size, CHUNK), dtype=dtype)

    def step(self, params, grads, t, lr, grad_scale=1.0, lo=0, hi=None):
        """Update params[lo:hi] in place; t is the 1-based step count (bias correction)."""
        b1, b2, eps, wd = self.beta1, self.beta2, self.eps, self.weight_decay
        bc1, bc2 = 1.0 - b1 ** t, 1.0 - b2 ** t
        per_lr = bc1 / lr if lr else np.inf  # lr = 0: the moments move, the parameters do not
        hi = params.size if hi is None else hi
        for a in range(lo, hi, CHUNK):
            z = min(a + CHUNK, hi)
            p, g, m, v = params[a:z], grads[a:z], self.m[a:z], self.v[a:z]
            tmp, gs = self._tmp[:z - a], self._tmp2[:z - a]
            if grad_scale != 1.0:
                np.multiply(g, grad_scale, out=gs)
                g = gs
            m *= b1                               # m = b1*m + (1-b1)*g
            np.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            v *= b2                               # v = b2*v + (1-b2)*g*g
            np.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2
            v += tmp
            np.multiply(v, 1.0 / bc2, out=tmp)    # sqrt(v_hat) + eps
            np.sqrt(tmp, out=tmp)
            tmp += eps
            tmp *= per_lr                         # lr * m_hat / (sqrt(v_hat) + eps)
            np.divide(m, tmp, out=tmp)            #   = m / ((sqrt(v_hat) + eps) * bc1 / lr)
            if wd != 0.0:                         # + lr * wd * param (the old param)
                np.multiply(p, lr * wd, out=gs)
                tmp += gs
            p -= tmp

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

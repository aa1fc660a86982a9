"""Load the compiled loops before the first step.

numba compiles each loop of model/loops.py and optim.py on first use, or loads it from its
disk cache: 0.33 s in a fresh process with every loop cached (measured 2026-12-07; when the
loops that call `dot` still missed the cache, the first forward + backward of gpt2-tiny took
1.17 + 0.88 s, the second 0.04 + 0.06 s). Inside step 0 that time looks like a stall to
the ranks waiting on this one, and the stall report (`--stall-seconds`) names it as one. So
set-up runs one training step of a tiny model in the run's dtype: every op and loop a step
uses runs once, with the same kinds of arrays, and the first real step pays nothing extra.
(docs/design.md#fused-elementwise-loops)
"""

import numpy as np

from mpigpt2.model.config import GPTConfig
from mpigpt2.model.gpt import GPT
from mpigpt2.model.optim import AdamW

# one layer, two heads of 8 channels, a 100-token vocabulary padded to 128: the whole model
TINY = GPTConfig(max_seq_len=16, vocab_size=100, padded_vocab_size=128, num_layers=1,
                 num_heads=2, channels=16)


def warm_up(dtype):
    """One forward, backward and AdamW step of TINY in dtype; returns its loss."""
    model = GPT(TINY, np.dtype(dtype), seed=0)
    tokens = np.arange(8, dtype=np.int32).reshape(1, 8)  # (B=1, T=8)
    loss = model.forward(tokens, tokens)
    model.backward()
    AdamW(model.flat.size, model.flat.dtype).step(model.flat, model.grad_flat, 1, 1e-4)
    return loss

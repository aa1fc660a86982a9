"""Parameter layout: llm.c's 16 tensors, for the whole model or a stage's layer range.

A stage owns layers [l0, l1) (a rank with virtual stages several such ranges: RankSpec); the first stage also owns wte and wpe, the last stage wte (tied,
for the logits) and lnfw/lnfb. All of a stage's tensors live in one flat buffer, in llm.c order,
so the optimizer and the gradient reduction see one array.
"""

from dataclasses import dataclass

import numpy as np

# llm.c's order; per-layer tensors have a leading L dimension
PARAM_NAMES = ("wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
               "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb")
LAYER_NAMES = PARAM_NAMES[2:14]


def tensor_shapes(cfg, nl):
    """Shape of each tensor for nl layers (global model: nl = L)."""
    C, Vp, maxT = cfg.channels, cfg.padded_vocab_size, cfg.max_seq_len
    return {
        "wte": (Vp, C), "wpe": (maxT, C),
        "ln1w": (nl, C), "ln1b": (nl, C),
        "qkvw": (nl, 3 * C, C), "qkvb": (nl, 3 * C),
        "attprojw": (nl, C, C), "attprojb": (nl, C),
        "ln2w": (nl, C), "ln2b": (nl, C),
        "fcw": (nl, 4 * C, C), "fcb": (nl, 4 * C),
        "fcprojw": (nl, C, 4 * C), "fcprojb": (nl, C),
        "lnfw": (C,), "lnfb": (C,),
    }


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model a stage owns."""
    l0: int
    l1: int
    first: bool
    last: bool

    def names(self):
        owned = []
        for n in PARAM_NAMES:
            if n == "wte" and not (self.first or self.last):
                continue
            if n == "wpe" and not self.first:
                continue
            if n in ("lnfw", "lnfb") and not self.last:
                continue
            owned.append(n)
        return owned

    @property
    def layers(self):
        """The global indices of the layers owned, in local order."""
        return tuple(range(self.l0, self.l1))

    @property
    def chunks(self):
        return (self,)


@dataclass(frozen=True)
class RankSpec:
    """What a rank owns when it holds several stages (virtual stages, docs/design.md#
    virtual-stages): its chunks in ascending stage order, their layers one after the other
    in one buffer; wte once even when it holds both the first and the last stage (the tied
    embedding's two uses then accumulate into one gradient)."""
    chunks: tuple  # of StageSpec

    @property
    def first(self):
        return any(c.first for c in self.chunks)

    @property
    def last(self):
        return any(c.last for c in self.chunks)

    @property
    def layers(self):
        return tuple(i for c in self.chunks for i in c.layers)

    names = StageSpec.names


def full_spec(cfg):
    return StageSpec(0, cfg.num_layers, True, True)


class ParamLayout:
    """Offsets of a stage's tensors inside its flat buffer."""

    def __init__(self, cfg, spec):
        self.cfg, self.spec = cfg, spec
        shapes = tensor_shapes(cfg, len(spec.layers))
        self.shapes, self.offsets = {}, {}
        off = 0
        for n in spec.names():
            self.shapes[n] = shapes[n]
            self.offsets[n] = off
            off += int(np.prod(shapes[n]))
        self.size = off

    def views(self, flat):
        """Named views into flat (size,) array."""
        assert flat.shape == (self.size,)
        return {n: flat[o:o + int(np.prod(s))].reshape(s)
                for (n, s), o in zip(self.shapes.items(), self.offsets.values())}

    def alloc(self, dtype):
        flat = np.zeros(self.size, dtype=dtype)
        return flat, self.views(flat)


def num_parameters(cfg):
    """Parameter count of the whole model as llm.c counts it (padded wte included once)."""
    return ParamLayout(cfg, full_spec(cfg)).size


def init_params(cfg, spec, views, seed):
    """GPT-2 init, layout-independent: each (tensor, layer) draws from its own seeded stream."""
    L = cfg.num_layers
    std_proj = 0.02 / np.sqrt(2 * L)
    for idx, n in enumerate(PARAM_NAMES):
        if n not in views:
            continue
        v = views[n]
        if n in ("ln1w", "ln2w", "lnfw"):
            v[...] = 1.0
        elif n.endswith("b"):
            v[...] = 0.0
        elif n == "wte":
            rng = np.random.default_rng([seed, idx])
            v[:cfg.vocab_size] = rng.normal(0.0, 0.02, (cfg.vocab_size, cfg.channels))
            v[cfg.vocab_size:] = 0.0
        elif n == "wpe":
            v[...] = np.random.default_rng([seed, idx]).normal(0.0, 0.02, v.shape)
        else:
            std = std_proj if n in ("attprojw", "fcprojw") else 0.02
            for i, layer in enumerate(spec.layers):
                rng = np.random.default_rng([seed, idx, layer])
                v[i] = rng.normal(0.0, std, v.shape[1:])

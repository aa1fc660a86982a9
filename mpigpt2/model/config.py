"""Model shape dataclass and the named presets."""

from dataclasses import dataclass, asdict

from mpigpt2.base.errors import UserError


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 shape, named as in llm.c's header: maxT, V, Vp, L, NH, C."""
    max_seq_len: int = 1024   # maxT
    vocab_size: int = 50257   # V
    padded_vocab_size: int = 50304  # Vp (multiple of 128, as llm.c pads)
    num_layers: int = 12      # L
    num_heads: int = 12       # NH
    channels: int = 768       # C

    def __post_init__(self):
        for name, v in asdict(self).items():
            if not isinstance(v, int) or v <= 0:
                raise UserError(f"model config: {name} must be a positive integer, got {v!r}")
        if self.channels % self.num_heads:
            raise UserError(f"model config: channels {self.channels} not divisible by "
                            f"num_heads {self.num_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(f"model config: padded vocab {self.padded_vocab_size} < vocab "
                            f"{self.vocab_size}")

    def as_dict(self):
        return asdict(self)


def pad_vocab(V, multiple=128):
    """llm.c pads the vocabulary up to a multiple of 128 for efficient matmuls."""
    return (V + multiple - 1) // multiple * multiple


def _preset(L, NH, C, maxT=1024, V=50257):
    return GPTConfig(max_seq_len=maxT, vocab_size=V, padded_vocab_size=pad_vocab(V),
                     num_layers=L, num_heads=NH, channels=C)


PRESETS = {
    "gpt2-124m": _preset(12, 12, 768),
    "gpt2-350m": _preset(24, 16, 1024),
    "gpt2-774m": _preset(36, 20, 1280),
    "gpt2-1558m": _preset(48, 25, 1600),
    # small enough to learn tinyshakespeare visibly in minutes on 2 cores
    "gpt2-tiny": _preset(4, 4, 128, maxT=256),
}


def preset(name):
    """Return the GPTConfig for a preset name, or a UserError listing the known names."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r} for --model; known presets: "
                        f"{', '.join(PRESETS)} (or pass a path to an llm.c .bin file)")
    return PRESETS[name]

"""Resume policy: which changes between a checkpoint and the new flags are refused, and which
are allowed but named (the checkpoint format itself is formats.checkpoint)."""

from dataclasses import dataclass

from mpigpt2.base.errors import UserError


@dataclass
class Resume:
    """The checkpoint a run continues from, validated against the flags."""
    path: str
    state: dict

    @property
    def step(self):
        return self.state["step"]

    @property
    def layout(self):
        """The layout the checkpoint was written with (a dict), or None (older checkpoints)."""
        return self.state.get("layout")


def check_compatible(state, cfg, dtype, B, T, data_files, path):
    """Refuse a resume that would silently change the run: model shape, data, B, T, dtype."""
    if state["model"] != cfg.as_dict():
        raise UserError(f"--resume {path}: the checkpoint's model {state['model']} differs from "
                        f"--model ({cfg.as_dict()}); resume with the same model")
    if state["dtype"] != dtype:
        raise UserError(f"--resume {path}: the checkpoint is {state['dtype']}, --dtype is {dtype}")
    if (state["batch_size"], state["seq_len"]) != (B, T):
        raise UserError(f"--resume {path}: saved with --batch-size {state['batch_size']} "
                        f"--seq-len {state['seq_len']}; resume with the same values")
    if state["data"]["train"] != data_files:
        raise UserError(f"--resume {path}: the training data changed (saved "
                        f"{state['data']['train']}, now {data_files}); resume with the same "
                        f"--train-data")


# flags whose change on resume alters the continued run (the model, data, B, T and dtype
# are refused outright by check_compatible; the data order too, see changed_hyperparameters)
HYPER_FLAGS = ("lr", "beta1", "beta2", "eps", "weight_decay", "warmup_steps", "lr_schedule",
               "min_lr_frac", "grad_clip", "steps")


def changed_hyperparameters(state, args, path):
    """Refuse a changed data order; return a description of changed optimizer/schedule flags
    ('' if none). --steps counts only when the lr schedule depends on it."""
    saved = state.get("args") or {}

    def order(v):  # no flag / bare --shuffle (True in older checkpoints) / --shuffle llmc
        return "seeded" if v is True else (v or "sequential")
    if "shuffle" in saved and order(saved["shuffle"]) != order(args.shuffle):
        raise UserError(f"--resume {path}: saved with data order {order(saved['shuffle'])}, now "
                        f"{order(args.shuffle)}; the data order would change — resume with the "
                        f"same --shuffle")
    if order(args.shuffle) == "seeded" and "seed" in saved and saved["seed"] != args.seed:
        raise UserError(f"--resume {path}: saved with --seed {saved['seed']}, now {args.seed}; "
                        f"with --shuffle the seed fixes the data order — resume with the same "
                        f"--seed")
    out = []
    for flag in HYPER_FLAGS:
        if flag not in saved or saved[flag] == getattr(args, flag):
            continue
        if flag == "steps" and args.lr_schedule == "constant" and \
                saved.get("lr_schedule", "constant") == "constant":
            continue  # more or fewer steps of a constant lr: the steps done are the same
        out.append(f"--{flag.replace('_', '-')} {saved[flag]} -> {getattr(args, flag)}")
    return ", ".join(out)

"""The set-up of a training run: every check that user input can fail, before any compute.

Every rank runs plan(); train.py makes the ranks agree on the outcome (failure.agree), so a
bad flag ends every rank with one line and status 2.
"""

import os
from dataclasses import dataclass
from typing import Optional

from mpigpt2 import resume as rs
from mpigpt2.base.errors import UserError
from mpigpt2.formats import checkpoint as ck
from mpigpt2.formats.data import DataLoader
from mpigpt2.formats.models import load_config
from mpigpt2.model.config import GPTConfig
from mpigpt2.options import check_args
from mpigpt2.base.files import check_writable
from mpigpt2.outputs import check_out_dir
from mpigpt2.base.machine import available_memory_bytes, shm_room
from mpigpt2.parallel import layout as lay, memory as mem

DEFAULT_VAL = "data/tinyshakespeare/tiny_shakespeare_val.bin"


@dataclass
class Plan:
    """What the flags resolve to: the model shape, the layout, the data, the resume point."""
    cfg: GPTConfig
    layout: lay.Layout
    train: DataLoader
    val: Optional[DataLoader]
    resume: Optional[rs.Resume]
    notes: list  # printed by rank 0 once the run starts
    net: tuple = (None, "")  # (stepcost.Net the default layout used, where it came from)

    @property
    def start_step(self):
        return self.resume.step if self.resume is not None else 0


def node_memory_bytes():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def plan(args, world, node_ranks=(0,), node_of=None, net=(None, ""), shm_free=None):
    """Check the flags and files and resolve them into a Plan (world: the grid's size,
    node_ranks: the world ranks on this rank's node, node_of: every rank's node, net: the
    (stepcost.Net, source) of train.network, shm_free: the least /dev/shm free on any node,
    default this node's)."""
    shm = shm_room(shm_free)
    check_args(args)
    cfg = load_config(args.model)
    B, T = args.batch_size, args.seq_len
    if T > cfg.max_seq_len:
        raise UserError(f"--seq-len {T} exceeds the model's maximum sequence length "
                        f"{cfg.max_seq_len} (maxT)")
    layout = lay.resolve(world, cfg, B, T, args.pp, args.dp, args.stage_layers,
                         args.microbatches,
                         None if args.slice_tokens == "auto" else args.slice_tokens, args.schedule,
                         node_memory_bytes(), len(node_ranks),
                         args.virtual_stages, args.rank_order,
                         node_of if node_of is not None and len(node_of) == world else None,
                         net[0], shared_default(args), shm, itemsize(args))
    train = DataLoader(args.train_data, B, T, vocab_size=cfg.vocab_size, flag="--train-data",
                       shuffle=args.shuffle, seed=args.seed)
    notes = [] if args.pp or args.dp else [default_note(args, cfg, layout, world, node_ranks,
                                                         node_of, net, shm)]
    val = validation_loader(args, cfg, notes)
    resume = find_resume(args, cfg, train, notes) if args.resume else None
    if not (args.print_schedule or args.no_memory_check):
        check_memory(args, cfg, layout, world, node_ranks,
                     node_of if node_of is not None and len(node_of) == world else None, shm)
    check_out_dir(args.out_dir)
    if args.schedule_out:
        if not args.print_schedule:
            raise UserError("--schedule-out needs --print-schedule")
        if os.path.lexists(args.schedule_out) and not os.path.isfile(args.schedule_out):
            raise UserError(f"--schedule-out {args.schedule_out} exists and is not a file")
        check_writable(os.path.dirname(os.path.abspath(args.schedule_out)), "--schedule-out")
    if args.save:
        if os.path.lexists(args.save) and not os.path.isfile(args.save):
            raise UserError(f"--save {args.save} exists and is not a regular file; give a file "
                            f"name like model.bin")
        check_writable(os.path.dirname(os.path.abspath(args.save)), "--save")
    return Plan(cfg, layout, train, val, resume, notes, net)


def itemsize(args):
    """Bytes of one value in the run's dtype."""
    return 8 if args.dtype == "float64" else 4


def shared_default(args, flag=None):
    """Whether --shared-dp auto (or on) would share where the node map allows it; with flag:
    whether it would with --shared-dp `flag` instead of the one given."""
    mode = flag or args.shared_dp
    return mode != "off" and not args.zero and args.grad_reduce == "auto"


def default_note(args, cfg, layout, world, node_ranks, node_of, net, shm=None):
    """Why the default layout: the step model's prediction for each pp it weighed."""
    node_of = node_of if node_of is not None and len(node_of) == world else None
    scores = lay.default_pp_scores(world, cfg, args.batch_size, args.seq_len,
                                   node_memory_bytes(), len(node_ranks), net[0], node_of,
                                   shared_default(args), shm, itemsize(args))
    nodes = node_of or [w // len(node_ranks) for w in range(world)]
    shares = shared_default(args) and mem.shared_copies(cfg, layout, nodes, itemsize(args),
                                                        shm) > 1
    others = ", ".join(f"pp {p} {1e3 * t:.0f}" for p, t in sorted(scores.items())
                       if p != layout.pp)
    return (f"layout: pp {layout.pp} × dp {layout.dp} by the step model: predicted "
            f"{1e3 * scores.get(layout.pp, float('nan')):.0f} ms/step"
            + (f" (ms/step of the others: {others})" if others else "")
            + (", node-shared dp" if shares else ""))


def validation_loader(args, cfg, notes):
    """--val-data, or the prepared tinyshakespeare val shard when it exists and fits."""
    B, T = args.batch_size, args.seq_len
    if args.val_data is None:  # the default is optional: skip validation when it does not fit
        args.val_data = ""
        if os.path.exists(DEFAULT_VAL):
            try:
                val = DataLoader(DEFAULT_VAL, B, T, vocab_size=cfg.vocab_size, flag="--val-data")
                args.val_data = DEFAULT_VAL
                return val
            except UserError as e:
                notes.append(f"note: no validation: the default {e}")
        return None
    if args.val_data:
        return DataLoader(args.val_data, B, T, vocab_size=cfg.vocab_size, flag="--val-data")
    return None


def find_resume(args, cfg, train, notes):
    """The checkpoint --resume names, validated against the flags; positions the loader."""
    path = ck.find(args.out_dir, args.resume)
    if path is None:
        return None
    state = ck.read_state(path)
    ck.verify_hashes(path, state)
    rs.check_compatible(state, cfg, args.dtype, args.batch_size, args.seq_len,
                        ck.data_identity(train.paths), path)
    if state["step"] > args.steps:
        raise UserError(f"--resume {path}: the checkpoint is at step {state['step']}, "
                        f"beyond --steps {args.steps}")
    changed = rs.changed_hyperparameters(state, args, path)
    if changed:
        notes.append(f"note: resuming {path} with changed hyperparameters ({changed}): the "
                     f"continued run will differ from an uninterrupted one")
    train.set_state(state["data"]["loader"])
    return rs.Resume(path, state)


def check_memory(args, cfg, layout, world, node_ranks, node_of=None, shm=None):
    """Refuse a run whose estimated peak (parallel/memory.py) exceeds what this node has left,
    naming the estimate and a layout that would fit."""
    limit = available_memory_bytes()
    if limit is None:
        return
    B, T, nbytes = args.batch_size, args.seq_len, itemsize(args)
    shared = shared_default(args)
    need, worst, rank = mem.node_estimate(cfg, layout, node_ranks, B, T, nbytes, args.zero,
                                          shared, node_of, shm)
    if need <= limit:
        return
    fit = mem.suggest(cfg, layout, world, node_ranks, B, T, nbytes, args.zero, limit, shared,
                      shared_default(args, flag="auto"), node_of, shm)
    hint = (f"try {fit[0][0]} (~{mem.size(fit[0][1])})" if fit else
            "no layout of these ranks fits: use more nodes, or a smaller model or batch")
    raise UserError(f"not enough memory: this run needs ~{mem.size(need)} on this node "
                    f"({len(node_ranks)} rank(s); rank {rank}: state {mem.size(worst.state)}, "
                    f"activations {mem.size(worst.activations)}, checkpoint gather "
                    f"{mem.size(worst.checkpoint)}), {mem.size(limit)} are available; {hint} "
                    f"(or --no-memory-check)")

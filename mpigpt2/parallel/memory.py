"""The memory a training run will allocate, estimated per rank before anything is allocated,
and a layout that would fit when the flags' one does not (pure; docs/design.md#memory).

Per rank (bytes of the training dtype, P = the stage's parameters, wte counted on the first
and on the last stage):
- parameters and gradients 2·P, Adam moments 2·P (2·P/dp with --zero 1, plus its gradient
  shard P/dp; node-shared dp with n replicas of the stage on the node: its gradient slot P
  and 1/n of the node's one copy of parameters and moments, 3·P/n);
- the message slabs of the pipeline: (M, n, b·k, C) per direction and role present;
- per micro-batch alive at once: K/V caches and their dK/dV accumulators, 4·L_s·b·T·C;
- per (micro-batch, slice) alive at once (forward done, backward not yet): per layer 14·C per
  token of saved activations plus the attention probabilities NH·T per token (bounded by the
  longest prefix), on the last stage also lnf (2·C per token) and the logits (Vp per token);
- the working set of one slice: its widest temporaries (16·C and 3·NH·T per token), one
  weight gradient's product when writes accumulate (4·C·C, or a block of the tied
  embedding's; a step's first write has none), on the last stage one more logits-sized array;
- 16 MiB of Python objects, MPI requests and small arrays;
- rank 0 at a checkpoint: the gathered model and both moments, 3·N (N = all parameters).
How many micro-batches and slices are alive at once is read off the rank's own action list
(the schedule is data), so every schedule is estimated by the same rule.
"""

from collections import Counter
from dataclasses import dataclass

from mpigpt2.base.errors import UserError
from mpigpt2.model.ops import ACC_BLOCK
from mpigpt2.model.params import ParamLayout, num_parameters
from mpigpt2.parallel.layout import common_replicas, resolve

GiB = 1 << 30
RUNTIME_BYTES = 16 << 20  # the step's Python objects, requests and small arrays, per rank


def size(nbytes):
    """'1.5 GiB' or '230 MiB'."""
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / (1 << 20):.0f} MiB"


def in_flight(program):
    """(most (micro-batch, slice) units alive, most micro-batches alive) over a program. A
    unit lives from its F to its B (or W: its activations serve the weight gradients); a
    micro-batch's K/V buffers from its first F to the B or I of slice 0."""
    units, alive = 0, {}
    peak_units = peak_mbs = 0
    for a in program:
        if a.kind == "F":
            units += 1
            alive[a.mb] = alive.get(a.mb, 0) + 1
        if a.kind in ("B", "W"):
            units -= 1
        if a.kind in ("B", "I") and a.j == 0:  # slice 0's backward is the micro-batch's last
            alive.pop(a.mb, None)
        peak_units, peak_mbs = max(peak_units, units), max(peak_mbs, len(alive))
    return peak_units, peak_mbs


def state_bytes(P, itemsize, dp, zero, shared_n=1):
    """One rank's parameters, gradients and Adam moments for a stage of P parameters: 4·P;
    --zero 1: 2·P + 2·P/dp + its gradient shard P/dp; node-shared dp with shared_n replicas of
    the stage on the node: its gradient slot P + 1/n of the node's one copy of parameters and
    moments (3·P/n). The one rule the trainer's check, the default layout and the planner use."""
    if zero:
        return (2 * P + 3 * P // dp) * itemsize
    if shared_n > 1:
        return (P + 3 * P // shared_n) * itemsize
    return 4 * P * itemsize


SHM_HEADROOM = 0.9  # node-shared dp's windows may fill this fraction of /dev/shm's free room


def shm_fits(nbytes, room):
    """Whether a node's shared windows (nbytes) fit /dev/shm's free room (None: unknown, assumed
    to): shared.choose's test, and the memory check's (node_estimate's shm)."""
    return room is None or nbytes <= SHM_HEADROOM * room


def stage_sizes(cfg, layout):
    """{stage: its parameters} (the tied wte on the first and on the last stage)."""
    return {s: ParamLayout(cfg, layout.rank_spec(s)).size for s in range(layout.pp)}


def node_states(layout, node_of, sizes, itemsize, n):
    """{node: the training state its ranks hold} (state_bytes of each rank's stage; n: the
    replicas of a stage sharing one copy per node, 1: private copies)."""
    nodes = Counter()
    for w in range(layout.pp * layout.dp):
        nodes[node_of[w]] += state_bytes(sizes[layout.coords(w)[0]], itemsize, layout.dp, 0, n)
    return nodes


def shared_copies(cfg, layout, node_of, itemsize, shm=None, sizes=None, replicas=None):
    """The replicas of a stage that share one copy per node under node-shared dp on node map
    node_of[world rank], or 1 where the run keeps private copies: the map must allow it
    (Layout.shared_replicas) and every node's windows fit shm, the least /dev/shm free on any
    node (shm_fits; None: unknown, assumed to), as shared.choose decides on all nodes alike.
    sizes: stage_sizes, if known; replicas: Layout.shared_replicas(node_of), if known."""
    n = layout.shared_replicas(node_of) if replicas is None else replicas
    if n == 1:
        return 1
    windows = node_states(layout, node_of, sizes or stage_sizes(cfg, layout), itemsize, n)
    return n if all(shm_fits(b, shm) for b in windows.values()) else 1


def default_rule_bytes(cfg, layout, node_of, shared, shm=None, itemsize=4):
    """(the fullest node's training state, whether node-shared dp runs) for the default
    layout's rule (layout.default_pp): each rank of layout on node map node_of holds its
    stage's state (node_states, the memory check's figure), node-shared where `shared` and
    shared_copies allows it (the map and /dev/shm's free bytes shm), as shared.choose decides."""
    sizes = stage_sizes(cfg, layout)
    n = shared_copies(cfg, layout, node_of, itemsize, shm, sizes) if shared else 1
    return max(node_states(layout, node_of, sizes, itemsize, n).values()), n > 1


@dataclass(frozen=True)
class Estimate:
    state: int        # parameters, gradients, optimizer state
    activations: int  # saved slices, K/V caches, message slabs, one slice's temporaries
    checkpoint: int   # extra on the rank that gathers and writes checkpoints

    @property
    def total(self):
        return self.state + self.activations + self.checkpoint


def rank_estimate(cfg, layout, rank, B, T, itemsize, zero, rank0=False, progs=None,
                  shared_n=1):
    """The bytes pipe rank `rank` allocates at its peak (each of its stages' activations
    counted at that stage's own peak: an upper bound with virtual stages); shared_n: the
    replicas of its stage sharing one copy on its node (node-shared dp)."""
    spec = layout.rank_spec(rank)
    P = ParamLayout(cfg, spec).size
    dp, M, k = layout.dp, layout.microbatches, layout.slice_tokens
    b = B // dp // M  # (k: the longest slice; a slab holds all T tokens of a micro-batch)
    C, NH, Vp = cfg.channels, cfg.num_heads, cfg.padded_vocab_size
    state = state_bytes(P, itemsize, dp, zero, shared_n)
    if progs is None:
        progs = layout.programs(T)
    prog = progs[rank]
    split = any(a.kind == "W" for a in prog)
    acts = slabs = 0
    for s, chunk in zip(layout.stages_of(rank), spec.chunks):
        units, mbs = in_flight([a for a in prog if a.s == s])
        nl = len(chunk.layers)
        per_unit = nl * b * k * (14 * C + NH * T) + (b * k * (2 * C + Vp) if chunk.last else 0)
        if split:  # I keeps W's output gradients: 11·C a layer
            per_unit += nl * b * k * 11 * C
        acts += units * per_unit + mbs * 4 * nl * b * T * C
        slabs += 2 * M * b * T * C * sum(a.kind in ("RECV_F", "RECV_B") and a.s == s and
                                             a.mb == 0 and a.j == 0 for a in prog)
    # a weight gradient's product exists only when a write accumulates (not the step's
    # first): 4·C·C, or one block of the tied embedding's (model.ops.ACC_BLOCK elements)
    accumulates = M * -(-T // k) * len(spec.chunks) > 1
    product = max(4 * C * C, min(Vp * C, ACC_BLOCK) if spec.last else 0) if accumulates else 0
    work = b * k * (16 * C + 3 * NH * T) + product + (b * k * Vp if spec.last else 0)
    activations = (acts + slabs + work) * itemsize + RUNTIME_BYTES
    checkpoint = 3 * num_parameters(cfg) * max(itemsize, 4) + (2 * P * itemsize if zero else 0)
    return Estimate(state, activations, checkpoint if rank0 else 0)


def node_estimate(cfg, layout, node_ranks, B, T, itemsize, zero, shared=False, node_of=None,
                  shm=None):
    """(bytes on this node at its peak, the largest rank's Estimate, that rank); shared:
    node-shared dp where the job's node map node_of[world rank] allows it
    (Layout.shared_replicas; None: every node holds as many ranks as this one, in blocks) and
    every node's windows fit shm, the least /dev/shm free on any node (None: unknown, assumed
    to), as shared.choose decides."""
    world = layout.pp * layout.dp
    nodes = node_of or [w // len(node_ranks) for w in range(world)]
    n = shared_copies(cfg, layout, nodes, itemsize, shm) if shared and not zero else 1
    progs = layout.programs(T)
    per = {r: rank_estimate(cfg, layout, layout.coords(r)[0], B, T, itemsize, zero, r == 0,
                            progs, n) for r in node_ranks}
    worst = max(per, key=lambda r: per[r].total)
    return sum(e.total for e in per.values()), per[worst], worst


def suggest(cfg, layout, world, node_ranks, B, T, itemsize, zero, limit, shared=False,
            shareable=False, node_of=None, shm=None):
    """The first layout that fits `limit` bytes on this node, fewest changes first: a list
    of (flags text, node bytes) with at most one entry, or []. shared: node-shared dp where
    the node map allows it (as node_estimate; a suggested --zero 1 turns it off);
    shareable: only --shared-dp off keeps it off, so turning it on is the first change tried
    (where the node map shares at all, and fits); node_of and shm as node_estimate's."""
    if shareable and not shared:
        need = node_estimate(cfg, layout, node_ranks, B, T, itemsize, zero, True, node_of,
                             shm)[0]
        if need <= limit:
            return [("--shared-dp auto", need)]
    for flags, kw, z, b in _alternatives(layout, world, B, T, zero):
        try:
            lay = resolve(world, cfg, b, T, **kw, virtual_stages=layout.virtual_stages)
        except UserError:
            continue
        need = node_estimate(cfg, lay, node_ranks, b, T, itemsize, z, shared, node_of, shm)[0]
        if need <= limit:
            return [(flags, need)]
    return []


def _alternatives(layout, world, B, T, zero):
    """(flags text, resolve() keywords, zero, B) to try, fewest and mildest changes first."""
    base = dict(pp=layout.pp, dp=layout.dp, microbatches=layout.microbatches,
                slice_tokens=layout.slice_lengths or layout.slice_tokens, schedule=layout.schedule)
    out = []
    if not zero and layout.dp > 1:
        out.append(("--zero 1", base, 1, B))
    rows = B // layout.dp
    for m in (m for m in range(layout.microbatches + 1, rows + 1) if rows % m == 0):
        out.append((f"--microbatches {m}", dict(base, microbatches=m), zero, B))
    for k in (k for k in range(layout.slice_tokens - 1, 0, -1) if T % k == 0):
        out.append((f"--slice-tokens {k}", dict(base, slice_tokens=k), zero, B))
    for pp in (p for p in range(layout.pp + 1, world + 1) if world % p == 0):
        for z in sorted({zero, 1} if world // pp > 1 else {zero}):
            extra = " --zero 1" if z and not zero else ""
            out.append((f"--pp {pp} --dp {world // pp}{extra}",
                        dict(pp=pp, dp=world // pp), z, B))
    b = B
    while b % 2 == 0:
        b //= 2
        out.append((f"--batch-size {b}", dict(base, microbatches=None), zero, b))
    return out

"""The parallel layout: pp × dp grid sizes, stage partition, micro-batches and slices (pure).
(docs/design.md#layout)"""

import functools
from collections import Counter
from dataclasses import dataclass, asdict

from mpigpt2.base.errors import UserError
from mpigpt2.model.params import StageSpec, RankSpec
from mpigpt2.parallel import costs

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "looped-bfs", "zb-h1", "zb-v")


def common_replicas(counts):
    """Node-shared dp's rule (shared.choose, and every estimate of it): given how many
    replicas of a stage each (node, stage) holds, the job shares when all hold the same n ≥ 2
    (n: one copy per n ranks), and not at all otherwise (1): nodes with unequal numbers of a
    stage's replicas would need windows of different shapes."""
    counts = set(counts)
    return counts.pop() if len(counts) == 1 else 1


@dataclass(frozen=True)
class Layout:
    """Resolved parallel layout; every rank computes the same one from the same flags."""
    pp: int
    dp: int
    stage_layers: tuple     # layers per stage (pp·v stages), sums to L
    microbatches: int       # M per replica per step
    slice_tokens: int       # k; T // k slices per micro-batch (explicit lengths: the longest)
    schedule: str
    virtual_stages: int = 1  # v: stages per rank (docs/design.md#virtual-stages)
    placement: tuple = ()    # the pipe rank of every stage; () = one stage per rank
    slice_lengths: tuple = ()  # explicit slice lengths summing to T; () = uniform k
                               # (docs/design.md#non-uniform-slices)
    rank_order: str = "pipe"   # pipe: world rank = replica·pp + stage; data: stage·dp + replica
                               # (docs/design.md#layout)

    def coords(self, rank):
        """(pipe rank, replica) of world rank `rank`."""
        if self.rank_order == "data":
            return rank // self.dp, rank % self.dp
        return rank % self.pp, rank // self.pp

    def shared_replicas(self, node_of=None):
        """The replicas of a stage that share one copy under node-shared dp on node map
        node_of[world rank] (None: one node): common_replicas over every (node, stage)."""
        world = self.pp * self.dp
        nodes = node_of or [0] * world
        return common_replicas(Counter((nodes[w], self.coords(w)[0]) for w in range(world))
                               .values())

    def world_rank(self, stage, replica):
        return stage * self.dp + replica if self.rank_order == "data" else replica * self.pp + stage

    def lengths(self, T):
        """The token count of every slice of a micro-batch, in order."""
        return self.slice_lengths or (self.slice_tokens,) * (T // self.slice_tokens)

    def n_slices(self, T):
        return len(self.lengths(T))

    def slices_text(self, T):
        """k=32, or the explicit lengths 96,64,48,48."""
        if self.slice_lengths:
            return ",".join(map(str, self.slice_lengths))
        return str(self.slice_tokens)

    @property
    def stages(self):
        return len(self.stage_layers)

    @property
    def ranks_of_stages(self):
        return self.placement or tuple(range(self.pp))

    def spec(self, stage):
        """The layers of global stage `stage`."""
        l0 = sum(self.stage_layers[:stage])
        return StageSpec(l0, l0 + self.stage_layers[stage], stage == 0, stage == self.stages - 1)

    def stages_of(self, rank):
        """The stages pipe rank `rank` holds, ascending."""
        return tuple(s for s, r in enumerate(self.ranks_of_stages) if r == rank)

    @property
    def wte_ranks(self):
        """The pipe ranks holding the first and the last stage (the tied wte)."""
        return (self.ranks_of_stages[0], self.ranks_of_stages[-1])

    def rank_spec(self, rank):
        """What pipe rank `rank` owns: one StageSpec, or a RankSpec of its chunks."""
        chunks = tuple(self.spec(s) for s in self.stages_of(rank))
        return chunks[0] if len(chunks) == 1 else RankSpec(chunks)

    def programs(self, T):
        """Every pipe rank's training program (parallel/schedule.py)."""
        from mpigpt2.parallel import schedule
        return schedule.build(self.schedule, self.pp, self.microbatches, self.n_slices(T),
                              self.ranks_of_stages)

    def as_dict(self):
        d = asdict(self)
        d["stage_layers"] = list(self.stage_layers)
        d["placement"] = list(self.ranks_of_stages)
        d["slice_lengths"] = list(self.slice_lengths)
        return d


def default_pp(world, cfg, B, T, mem_bytes=None, ranks_per_node=None, net=None, node_of=None,
               shared=True, shm=None, itemsize=4):
    """Default rule: among the pp that divide world (pp ≤ L, B divisible by dp·pp) whose
    fullest node's training state (memory.default_rule_bytes) fits in half the node's memory,
    the one with the smallest predicted step time (stepcost.default_layout_seconds on the
    job's network; ties: the larger pp). dp = world / pp. Both count node-shared dp (where
    `shared`) exactly where the run would share: the scored layout's node map and rank order
    (Layout.shared_replicas) and room in /dev/shm (shm: its free bytes, None: unknown), in
    the run's dtype (itemsize bytes)."""
    scores = default_pp_scores(world, cfg, B, T, mem_bytes, ranks_per_node, net, node_of,
                               shared, shm, itemsize)
    return min(scores, key=lambda p: (scores[p], -p))


def default_pp_scores(world, cfg, B, T, mem_bytes=None, ranks_per_node=None, net=None,
                      node_of=None, shared=True, shm=None, itemsize=4):
    """{pp: predicted seconds per step} of default_pp's candidates."""
    from mpigpt2.parallel.memory import default_rule_bytes
    from mpigpt2.parallel.stepcost import default_layout_seconds
    L = cfg.num_layers
    ranks_per_node = ranks_per_node or world
    nodes = node_of or [w // ranks_per_node for w in range(world)]
    cands = [p for p in range(1, min(world, L) + 1)
             if world % p == 0 and B % ((world // p) * p) == 0]
    if not cands:
        cands = [p for p in range(1, min(world, L) + 1) if world % p == 0 and B % (world // p) == 0]
    if not cands:
        cands = [max(p for p in range(1, min(world, L) + 1) if world % p == 0)]
    scored = {p: scored_layout(cfg, B, T, world, p, nodes) for p in cands}
    rule = {p: default_rule_bytes(cfg, lay, nodes, shared, shm, itemsize)
            for p, lay in scored.items()}  # (state bytes of the fullest node, shares)
    if mem_bytes:
        cands = [p for p in cands if rule[p][0] <= mem_bytes / 2] or [max(cands)]
    return {p: default_layout_seconds(cfg, scored[p], B, T, net, nodes, rule[p][1])
            for p in cands}


def scored_layout(cfg, B, T, world, pp, node_of):
    """The layout default_pp scores for pp: 1F1B over M = pp micro-batches (1 when B does not
    split so) of 4 slices at pp > 1, balanced stages, in the rank order resolve would pick."""
    from dataclasses import replace
    dp = world // pp
    M = pp if B % dp == 0 and (B // dp) % pp == 0 else 1
    n = 4 if pp > 1 and T % 4 == 0 else 1
    lay = Layout(pp, dp, balanced_partition(cfg, T, pp), M, T // n, "1f1b")
    return replace(lay, rank_order=choose_rank_order(cfg, lay, B, T, node_of, "auto"))


@functools.lru_cache(maxsize=256)
def balanced_partition(cfg, T, pp):
    """Contiguous split of L layers into pp stages (≥ 1 each) minimising the dearest stage."""
    L = cfg.num_layers
    lc = costs.layer_cost(cfg, T)
    extra = costs.stage_costs(cfg, T, [0] * pp)  # the embedding and the head
    # best[s][l]: minimal max cost splitting the first l layers over stages 0..s
    INF = float("inf")
    best = [[INF] * (L + 1) for _ in range(pp)]
    choice = [[0] * (L + 1) for _ in range(pp)]
    for l in range(1, L + 1):
        best[0][l] = extra[0] + l * lc
    for s in range(1, pp):
        for l in range(s + 1, L + 1):
            for n in range(1, l - s + 1):  # layers on stage s
                c = max(best[s - 1][l - n], extra[s] + n * lc)
                if c < best[s][l]:
                    best[s][l], choice[s][l] = c, n
    counts, l = [], L
    for s in range(pp - 1, 0, -1):
        n = choice[s][l]
        counts.append(n)
        l -= n
    counts.append(l)
    return tuple(reversed(counts))


def parse_stage_layers(text, pp, L, v=1):
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--stage-layers {text!r}: expected comma-separated layer counts like 4,3,3,2")
    if len(counts) != pp * v:
        per = f"--pp {pp}" if v == 1 else f"--pp {pp} × --virtual-stages {v} = {pp * v} stages"
        raise UserError(f"--stage-layers {text!r} has {len(counts)} entries but {per}"
                        f"{' is' if v == 1 else ''}; give one layer count per stage")
    if min(counts) < 1:
        empty = [s for s, n in enumerate(counts) if n < 1]
        raise UserError(f"--stage-layers {text!r}: stage {empty[0]} has {counts[empty[0]]} "
                        f"layers; every stage needs ≥ 1 layer")
    if sum(counts) != L:
        raise UserError(f"--stage-layers {text!r} sums to {sum(counts)} but the model has {L} "
                        f"layers; the counts must add up to L (no layer dropped or duplicated)")
    return counts


def _schedule_error(flag, e):
    """A schedule that breaks a rule: its one-line reason, then the table with the cell marked."""
    lines = str(e).splitlines() or [type(e).__name__]
    return UserError("\n".join([f"{flag}: {lines[0]}"] + lines[1:]))


def file_placement(path, pp, M, n):
    """The placement a --schedule file implies (which stages each row uses): one line if the
    file cannot be read."""
    from mpigpt2.base.files import require_regular
    from mpigpt2.parallel import schedule_file
    require_regular(path, "--schedule")
    try:
        return schedule_file.compute_lists(schedule_file.read_rows(path), pp, M, n)[0]
    except (OSError, ValueError) as e:  # (ScheduleError is a ValueError)
        raise _schedule_error(f"--schedule {path}", e) from None


def placement_for(schedule, pp, v, L):
    """The placement of schedule with v stages per rank (UserError naming the flag if the
    schedule and v do not fit together or pp·v exceeds the layers)."""
    from mpigpt2.parallel import builders, schedule as sch
    if v < 1:
        raise UserError(f"--virtual-stages must be ≥ 1, got {v}")
    if pp * v > L:
        raise UserError(f"--virtual-stages {v}: pp {pp} × {v} = {pp * v} stages, but the model "
                        f"has {L} layers; every stage needs ≥ 1 layer")
    if v > 1 and schedule in ("gpipe", "1f1b"):
        raise UserError(f"--schedule {schedule} runs one stage per rank; with --virtual-stages "
                        f"{v} choose interleaved-1f1b, looped-bfs, zb-h1 or zb-v")
    if schedule == "zb-v" and v != 2:
        raise UserError(f"--schedule zb-v places two stages on every rank (r and 2p-1-r); it "
                        f"needs --virtual-stages 2, got {v}")
    if builders.PLACEMENT.get(schedule) == "v":
        return sch.v_placement(pp)
    return sch.loop_placement(pp, v)


def resolve_slices(slice_tokens, T, pp):
    """(k, explicit lengths or ()) from --slice-tokens: None (the default: T at pp 1, else
    the largest divisor of T up to T/4), a k dividing T, or a sequence of lengths ≥ 1 summing
    to T (docs/design.md#non-uniform-slices)."""
    if slice_tokens is None:
        return (T if pp == 1 or T < 4 else
                max(d for d in range(1, T // 4 + 1) if T % d == 0)), ()
    if isinstance(slice_tokens, (tuple, list)):
        lengths = tuple(slice_tokens)
        text = ",".join(map(str, lengths))
        if min(lengths) < 1:
            raise UserError(f"--slice-tokens {text}: slice {lengths.index(min(lengths))} has "
                            f"{min(lengths)} tokens; every slice needs ≥ 1")
        if sum(lengths) != T:
            raise UserError(f"--slice-tokens {text} sums to {sum(lengths)} tokens, but "
                            f"--seq-len is {T}; the lengths must add up to T")
        if len(set(lengths)) == 1:  # uniform after all
            return lengths[0], ()
        return max(lengths), lengths
    if slice_tokens < 1:
        raise UserError(f"--slice-tokens must be ≥ 1, got {slice_tokens}")
    if T % slice_tokens:
        raise UserError(f"--slice-tokens {slice_tokens} does not divide --seq-len {T}; give a "
                        f"divisor, or explicit lengths summing to {T} (e.g. 48,16)")
    return slice_tokens, ()


RANK_ORDERS = ("pipe", "data", "auto")


def choose_rank_order(cfg, layout, B, T, node_of, order):
    """The rank order ("pipe" or "data") that sends fewer bytes between nodes per step
    (costs.cross_node_bytes) on this node map (node_of[world rank]); "pipe" on one node or a
    tie. An explicit order is kept."""
    if order != "auto":
        return order
    if not node_of or len(set(node_of)) < 2:
        return "pipe"
    from dataclasses import replace
    from mpigpt2.model.params import ParamLayout
    wte = 4 * cfg.padded_vocab_size * cfg.channels
    stage_bytes = [4 * ParamLayout(cfg, layout.rank_spec(r)).size
                   - (wte if r in layout.wte_ranks and layout.pp > 1 else 0)
                   for r in range(layout.pp)]
    act = 2 * (B // layout.dp) * T * cfg.channels * 4
    cost = {o: costs.cross_node_bytes(replace(layout, rank_order=o), node_of, stage_bytes, act,
                                      wte if layout.pp > 1 else 0)
            for o in ("pipe", "data")}
    return "data" if cost["data"] < cost["pipe"] else "pipe"


def resolve(world, cfg, B, T, pp=None, dp=None, stage_layers=None, microbatches=None,
            slice_tokens=None, schedule=None, mem_bytes=None, ranks_per_node=None,
            virtual_stages=None, rank_order="pipe", node_of=None, net=None, shared=True,
            shm=None, itemsize=4):
    """Check the requested layout and fill in defaults; raise UserError naming the bad flag.
    shared: the default layout may count on node-shared dp (--shared-dp not off) where
    /dev/shm's free bytes (shm; None: unknown) hold its windows (of itemsize-byte values)."""
    L = cfg.num_layers
    for flag, v in (("--pp", pp), ("--dp", dp), ("--microbatches", microbatches)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be ≥ 1, got {v}")
    if pp is None and dp is None:
        pp = default_pp(world, cfg, B, T, mem_bytes, ranks_per_node, net, node_of, shared, shm,
                        itemsize)
    if pp is None:
        if world % dp:
            raise UserError(f"--dp {dp} does not divide the {world} MPI ranks")
        pp = world // dp
    if dp is None:
        if world % pp:
            raise UserError(f"--pp {pp} does not divide the {world} MPI ranks")
        dp = world // pp
    if pp * dp != world:
        raise UserError(f"--pp {pp} × --dp {dp} = {pp * dp}, but mpiexec started {world} ranks; "
                        f"make pp × dp equal the number of ranks")
    if pp > L:
        raise UserError(f"--pp {pp} exceeds the model's {L} layers; each stage needs ≥ 1 layer")
    if microbatches is None:
        microbatches = pp if (B % dp == 0 and (B // dp) % pp == 0) else 1
    if B % (dp * microbatches):
        raise UserError(f"--batch-size {B} is not divisible by dp × microbatches = {dp} × "
                        f"{microbatches}; each micro-batch needs the same number of sequences")
    slice_tokens, lengths = resolve_slices(slice_tokens, T, pp)
    n = len(lengths) if lengths else T // slice_tokens
    if schedule is None:
        schedule = "1f1b"  # never more memory than GPipe, the same bubble (any M: warm-up clamped)
    if schedule not in SCHEDULES and not schedule.endswith(".csv"):
        raise UserError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)} or "
                        f"give a schedule file (.csv)")
    if schedule.endswith(".csv"):
        placement = file_placement(schedule, pp, microbatches, n)
        v = len(placement) // pp
        if virtual_stages not in (None, v) or len(placement) % pp:
            raise UserError(f"--schedule {schedule} places {len(placement)} stages on {pp} "
                            f"ranks, but --virtual-stages is {virtual_stages}")
        placement_for("looped-bfs", pp, v, L)  # (the stage count check)
    else:
        v = virtual_stages if virtual_stages is not None else 2 if schedule == "zb-v" else 1
        placement = placement_for(schedule, pp, v, L)
    if len(placement) > pp and not stage_layers and L % len(placement):
        raise UserError(f"--virtual-stages {len(placement) // pp}: pp {pp} × "
                        f"{len(placement) // pp} = {len(placement)} stages do not divide the "
                        f"model's {L} layers; choose pp·v dividing {L}, or give each stage's "
                        f"layers with --stage-layers")
    counts = (parse_stage_layers(stage_layers, pp, L, len(placement) // pp) if stage_layers
              else balanced_partition(cfg, T, len(placement)))
    if rank_order not in RANK_ORDERS:
        raise UserError(f"--rank-order {rank_order!r}: choose one of {', '.join(RANK_ORDERS)}")
    layout = Layout(pp, dp, counts, microbatches, slice_tokens, schedule, len(placement) // pp,
                    () if placement == tuple(range(pp)) else placement, lengths)
    from dataclasses import replace
    layout = replace(layout, rank_order=choose_rank_order(cfg, layout, B, T, node_of,
                                                          rank_order))
    try:
        layout.programs(T)
    except (OSError, ValueError) as e:  # (ScheduleError is a ValueError)
        raise _schedule_error(f"--schedule {schedule}", e) from None
    return layout

"""Pipeline schedules as data: per-rank action lists, built, lowered and validated by pure functions.

An action is (kind, stage, mb, slice). Compute actions: F (forward of micro-batch mb, slice j
through pipeline stage s), B (its backward), or B split into I (input gradient) and W (weight
gradient). A rank holds one stage, or several (virtual stages: `placement[s]` is the rank of
stage s). Lowering adds the messages between ranks: RECV_F/RECV_B are pre-posted receives (all
at the start of the step), SEND_F follows each F whose next stage sits on another rank,
SEND_B each B or I whose previous stage does, and REDUCE (the data-parallel gradient reduction)
ends the list. Between two stages of the same rank the data is handed over in memory (no
action). Strings round-trip and follow torch.distributed.pipelining's names with our slice:
"0F1.2" (stage 0, micro-batch 1, slice 2), "1SEND_B2.0", "REDUCE".

GPipe, p=2, M=2, n=2, one tick per action:

    tick rank0    rank1
       0 0F0.0    .
       1 0F0.1    1F0.0
       2 0F1.0    1F0.1
       ...
(docs/design.md#schedules-as-data)
"""

import re
from collections import namedtuple

COMPUTE = ("F", "B", "I", "W")
KINDS = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "REDUCE")
BACKWARD_KINDS = ("B", "I")  # the actions that send the input gradient upstream
FORWARD, BACKWARD = 0, 1


class ScheduleError(ValueError):
    """A schedule breaks an ordering, matching or progress rule."""


class Action(namedtuple("Action", "kind s mb j")):
    __slots__ = ()

    def __str__(self):
        return self.kind if self.kind == "REDUCE" else f"{self.s}{self.kind}{self.mb}.{self.j}"

    @staticmethod
    def parse(text):
        if text == "REDUCE":
            return REDUCE()
        m = re.fullmatch(r"(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)\.(\d+)", text)
        if not m:
            raise ScheduleError(f"not an action: {text!r}")
        return Action(m.group(2), int(m.group(1)), int(m.group(3)), int(m.group(4)))


def F(s, mb, j):
    return Action("F", s, mb, j)


def B(s, mb, j):
    return Action("B", s, mb, j)


def I(s, mb, j):  # noqa: E743 (the zero-bubble papers' name)
    return Action("I", s, mb, j)


def W(s, mb, j):
    return Action("W", s, mb, j)


def REDUCE():
    """The data-parallel gradient reduction that ends a training program (built only here)."""
    return Action("REDUCE", -1, -1, -1)


class Pipe(namedtuple("Pipe", "p M n placement")):
    """The shape a schedule is built for: p ranks, M micro-batches of n slices, and the rank
    of every stage (placement; one stage per rank: (0, 1, …, p-1))."""
    __slots__ = ()

    @property
    def P(self):
        return len(self.placement)

    @property
    def v(self):
        return self.P // self.p

    def stages(self, r):
        """The stages rank r holds, ascending."""
        return tuple(s for s, q in enumerate(self.placement) if q == r)

    def local(self, a, b):
        """Stages a and b sit on the same rank (their messages are in-memory hand-offs)."""
        return self.placement[a] == self.placement[b]


def make_pipe(p, M, n, placement=None):
    placement = tuple(range(p)) if placement is None else tuple(placement)
    if sorted(set(placement)) != list(range(p)):
        raise ScheduleError(f"placement {placement} does not give every one of the {p} ranks "
                            f"a stage")
    return Pipe(p, M, n, placement)


def loop_placement(p, v):
    """Rank r holds stages r, r+p, r+2p, … (interleaved and looped schedules)."""
    return tuple(s % p for s in range(p * v))


def v_placement(p, v=2):
    """Rank r holds stages r and 2p-1-r (ZB-V, DualPipeV): the first and the last stage on
    rank 0."""
    return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))


def forward_units(M, n):
    return [(mb, j) for mb in range(M) for j in range(n)]


def backward_units(M, n):
    """Micro-batches in order, slices of each in reverse (the dK/dV accumulator needs it)."""
    return [(mb, j) for mb in range(M) for j in reversed(range(n))]


def lower(compute, r, pipe, train=True):
    """Add pre-posted receives, sends after each compute action whose peer stage sits on
    another rank, and (train) the final REDUCE."""
    P, M, n = pipe.P, pipe.M, pipe.n
    mine = pipe.stages(r)
    prog = [Action("RECV_F", s, mb, j) for s in mine if s > 0 and not pipe.local(s - 1, s)
            for mb, j in forward_units(M, n)]
    if train:
        prog += [Action("RECV_B", s, mb, j) for s in mine
                 if s < P - 1 and not pipe.local(s, s + 1) for mb, j in backward_units(M, n)]
    for a in compute:
        prog.append(a)
        if a.kind == "F" and a.s < P - 1 and not pipe.local(a.s, a.s + 1):
            prog.append(Action("SEND_F", a.s, a.mb, a.j))
        if a.kind in BACKWARD_KINDS and a.s > 0 and not pipe.local(a.s - 1, a.s):
            prog.append(Action("SEND_B", a.s, a.mb, a.j))
    if train:
        prog.append(REDUCE())
    return prog


_BUILT = {}             # (builder, p, M, n, placement) -> validated programs (tuples)
_BUILT_ACTIONS = 1 << 21  # actions kept in all (the planner prices each shape many times)


def build(name, p, M, n, placement=None):
    """Per-rank lowered programs for schedule name (a builder's name or a .csv file) over the
    stages of placement (default: one per rank); validated before they are returned. A
    builder's programs are pure functions of the shape: the last few are kept and copied out."""
    from mpigpt2.parallel import builders
    if name in builders.BUILDERS:
        key = (name, p, M, n, tuple(placement) if placement is not None else None)
        if key not in _BUILT:
            pipe = make_pipe(p, M, n, placement)
            progs = [lower(c, r, pipe) for r, c in enumerate(builders.BUILDERS[name](pipe))]
            validate(progs, pipe)
            _BUILT[key] = tuple(tuple(prog) for prog in progs)
            while len(_BUILT) > 1 and sum(map(len, (a for v in _BUILT.values() for a in v))) \
                    > _BUILT_ACTIONS:
                _BUILT.pop(next(iter(_BUILT)))  # the oldest first
        return [list(prog) for prog in _BUILT[key]]
    from mpigpt2.parallel import schedule_file  # a file names its own placement
    placement, compute = schedule_file.compute_lists(schedule_file.read_rows(name), p, M, n)
    pipe = make_pipe(p, M, n, placement)
    progs = [lower(c, r, pipe) for r, c in enumerate(compute)]
    validate(progs, pipe)
    return progs


def build_eval(p, M, n, placement=None):
    """Forward-only programs (validation loss): every stage's forwards in order (stages of a
    rank ascending per unit), lowered like a training program but without the final REDUCE."""
    pipe = make_pipe(p, M, n, placement)
    progs = [lower([F(s, mb, j) for mb, j in forward_units(M, n) for s in pipe.stages(r)],
                   r, pipe, train=False) for r in range(p)]
    simulate(progs)
    return progs


# ---------------------------------------------------------------------------------------------
# validation

def _check_rank(prog, r, pipe):
    where = f"rank {r}"
    M, n = pipe.M, pipe.n
    seen = {}
    for i, a in enumerate(prog):
        if a in seen:
            raise ScheduleError(f"{where}: {a} appears twice (steps {seen[a]} and {i})", a)
        seen[a] = i
        if a.kind != "REDUCE" and not (0 <= a.mb < M and 0 <= a.j < n):
            raise ScheduleError(f"{where}: {a} out of range (M={M}, n={n})", a)
        if a.kind != "REDUCE" and not (0 <= a.s < pipe.P and pipe.placement[a.s] == r):
            raise ScheduleError(f"{where}: {a} names stage {a.s}, which rank {r} does not "
                                f"hold (it holds {', '.join(map(str, pipe.stages(r)))})", a)
    split = 0
    for s in pipe.stages(r):
        back = {u: _check_unit(seen, where, s, *u) for u in forward_units(M, n)}
        split += sum(back[u].kind == "I" for u in back)
        _check_order(seen, where, s, back, M, n)
        _check_messages(seen, where, s, back, pipe)
    if prog.count(REDUCE()) != 1 or prog[-1].kind != "REDUCE":
        raise ScheduleError(f"{where}: REDUCE must come once, last", prog[-1])
    expect = len(pipe.stages(r)) * 2 * M * n + split + 1 + sum(
        M * n * 2 for s in pipe.stages(r) for q in (s - 1, s + 1)
        if 0 <= q < pipe.P and not pipe.local(q, s))
    if len(prog) != expect:
        raise ScheduleError(f"{where}: {len(prog)} actions, expected {expect}")


def _check_order(seen, where, s, back, M, n):
    """Forward slices ascend, backward slices descend, a backward after its micro-batch's
    last forward slice."""
    for mb, j in forward_units(M, n):
        b = seen[back[mb, j]]
        if j > 0 and seen[F(s, mb, j - 1)] > seen[F(s, mb, j)]:
            raise ScheduleError(f"{where}: {F(s, mb, j)} before {F(s, mb, j - 1)}: forward "
                                f"slices must ascend", F(s, mb, j))
        if j < n - 1 and seen[back[mb, j + 1]] > b:
            raise ScheduleError(f"{where}: {back[mb, j]} before {back[mb, j + 1]}: backward "
                                f"slices must descend", back[mb, j])
        if b < seen[F(s, mb, n - 1)]:
            raise ScheduleError(f"{where}: {back[mb, j]} before {F(s, mb, n - 1)}: a "
                                f"micro-batch's backward needs all of its forward slices",
                                back[mb, j])


def _check_messages(seen, where, s, back, pipe):
    """A receive posted before each compute action that needs another rank's data, a send
    after each one whose result another rank needs, and no message without a peer."""
    P = pipe.P
    has_prev = s > 0 and not pipe.local(s - 1, s)
    has_next = s < P - 1 and not pipe.local(s, s + 1)
    for mb, j in forward_units(pipe.M, pipe.n):
        need = ([("RECV_F", F(s, mb, j))] if has_prev else []) + \
            ([("RECV_B", back[mb, j])] if has_next else [])
        for rk, c in need:
            rcv = seen.get(Action(rk, s, mb, j))
            if rcv is None or rcv > seen[c]:
                raise ScheduleError(f"{where}: {c} has no receive posted before it", c)
        for sk, rk, c, ok in (("SEND_F", "RECV_B", F(s, mb, j), has_next),
                              ("SEND_B", "RECV_F", back[mb, j], has_prev)):
            snd = seen.get(Action(sk, s, mb, j))
            if ok and (snd is None or snd < seen[c]):
                raise ScheduleError(f"{where}: {Action(sk, s, mb, j)} missing or before {c}", c)
            if not ok and snd is not None:
                raise ScheduleError(f"{where}: {Action(sk, s, mb, j)} has no peer stage on "
                                    f"another rank", Action(sk, s, mb, j))
            if not ok and Action(rk, s, mb, j) in seen:
                raise ScheduleError(f"{where}: {Action(rk, s, mb, j)} has no peer stage on "
                                    f"another rank", Action(rk, s, mb, j))


def _check_unit(seen, where, s, mb, j):
    """A unit has its F and either B or both I and W, W after I; returns B or I."""
    f, b, i, w = (Action(k, s, mb, j) for k in ("F", "B", "I", "W"))
    if f not in seen:
        raise ScheduleError(f"{where}: missing {f}")
    if b in seen and (i in seen or w in seen):
        raise ScheduleError(f"{where}: {b} and {i if i in seen else w} both given: a unit's "
                            f"backward is either B or I and W", b)
    if b in seen:
        return b
    if i not in seen and w not in seen:
        raise ScheduleError(f"{where}: missing {b} (or {i} and {w}) of {f}", f)
    if i not in seen or w not in seen:
        raise ScheduleError(f"{where}: missing {w if i in seen else i}: I and W come in pairs",
                            i if i in seen else w)
    if seen[w] < seen[i]:
        raise ScheduleError(f"{where}: {w} before {i}: a weight gradient needs its input "
                            f"gradient's pass first", w)
    return i


def validate(progs, pipe):
    """Check every rule of the module docstring, then that the programs cannot deadlock.
    A broken rule raises ScheduleError whose first line names it, followed by the programs
    as a step × rank table with the offending action marked."""
    if len(progs) != pipe.p:
        raise ScheduleError(f"{len(progs)} rank programs for p = {pipe.p} ranks")
    for r, prog in enumerate(progs):
        try:
            _check_rank(prog, r, pipe)
        except ScheduleError as e:
            bad = e.args[1] if len(e.args) > 1 else None
            raise ScheduleError(f"{e.args[0]}\n" + listing(progs, (r, bad))) from None
    simulate(progs)


def listing(progs, mark=None):
    """The compute actions of each rank in program order (step × rank); mark = (rank,
    action), or a list of them, is shown as >action<."""
    marks = set(mark if isinstance(mark, list) else [mark] if mark else [])
    rows = [[a for a in prog if a.kind in COMPUTE or (r, a) in marks]
            for r, prog in enumerate(progs)]
    lines = ["step " + " ".join(f"rank{r:<6d}" for r in range(len(progs)))]
    for i in range(max(map(len, rows), default=0)):
        cells = []
        for r, row in enumerate(rows):
            a = row[i] if i < len(row) else None
            text = "" if a is None else (f">{a}<" if (r, a) in marks else str(a))
            cells.append(f"{text:10s}")
        lines.append(f"{i:4d} " + " ".join(cells))
    return "\n".join(lines)


def cost_of(kind, f_cost=1, b_cost=1, i_cost=1, w_cost=1):
    return {"F": f_cost, "B": b_cost, "I": i_cost, "W": w_cost}[kind]


def _dependency(a):
    """The compute action whose result a compute action a needs from its neighbour stage
    (on any rank), or None."""
    if a.kind == "F" and a.s > 0:
        return ("F", a.s - 1, a.mb, a.j)
    if a.kind in BACKWARD_KINDS:
        return ("back", a.s + 1, a.mb, a.j)
    return None


def simulate(progs, f_cost=1, b_cost=1, i_cost=1, w_cost=1, costs=None):
    """Execution in time; returns per-rank lists of (start, action).

    Costs per kind (integers: ticks), or costs(action) -> ticks (measured, any positive
    numbers; docs/design.md#predicted-and-measured-bubble). Sends complete at once (receives
    are pre-posted); an F waits for the F of the stage before it, a B or I for the B or I of
    the stage after it, on whichever rank (a W for nothing: its I came before it on the same
    rank). Raises ScheduleError on a deadlock.
    """
    kinds = dict(f_cost=f_cost, b_cost=b_cost, i_cost=i_cost, w_cost=w_cost)
    cost = costs or (lambda a: cost_of(a.kind, **kinds))
    p, last = len(progs), max(a.s for prog in progs for a in prog)
    comp = [[a for a in prog if a.kind in COMPUTE] for prog in progs]
    pc, free_at = [0] * p, [0] * p
    done = {}  # ("F" | "back", s, mb, j) -> time its result is available
    timeline = [[] for _ in range(p)]
    # An action starts when its rank is free and its input exists, so its start does not
    # depend on the order the ranks are advanced in: sweep the ranks, each as far as its
    # inputs allow, until all are done (or a sweep moves none: a deadlock).
    left = sum(len(c) for c in comp)
    while left:
        moved = 0
        for r in range(p):
            prog, i, t = comp[r], pc[r], free_at[r]
            while i < len(prog):
                a = prog[i]
                dep = _dependency(a)
                ready = 0 if dep is None or (dep[0] == "back" and dep[1] > last) \
                    else done.get(dep)
                if ready is None:
                    break
                start = max(t, ready)
                t = start + cost(a)
                done[("back" if a.kind in BACKWARD_KINDS else a.kind, a.s, a.mb, a.j)] = t
                timeline[r].append((start, a))
                i += 1
            moved += i - pc[r]
            pc[r], free_at[r] = i, t
        if not moved:
            stuck = [(r, comp[r][pc[r]]) for r in range(p) if pc[r] < len(comp[r])]
            raise ScheduleError(f"deadlock: ranks wait on {', '.join(str(a) for _, a in stuck)}"
                                f" (marked: each waits for another's)\n"
                                + listing(progs, stuck))
        left -= moved
    return timeline


def table(progs, upto=None, **costs):
    """The step × rank table: one row per tick, the compute action each rank runs ('.' = idle).
    costs: f_cost, b_cost, i_cost, w_cost as for simulate."""
    timeline = upto if upto is not None else simulate(progs, **costs)
    cells = {}
    for r, tl in enumerate(timeline):
        for t, a in tl:
            for d in range(cost_of(a.kind, **costs)):
                cells[(t + d, r)] = str(a)
    end = max([t for t, _ in cells] + [-1]) + 1
    p = len(timeline)
    lines = ["tick " + " ".join(f"rank{r:<4d}" for r in range(p))]
    for t in range(end):
        lines.append(f"{t:4d} " + " ".join(f"{cells.get((t, r), '.'):8s}" for r in range(p)))
    return "\n".join(lines)


def tag(direction, boundary, mb, j, P, M, n):
    """Message tag for (direction, stage boundary (the lower stage), micro-batch, slice):
    unique within a step."""
    return ((direction * P + boundary) * M + mb) * n + j


def untag(t, P, M, n):
    """Inverse of tag(): (direction, boundary, mb, j)."""
    return t // (P * M * n), (t // (M * n)) % P, (t // n) % M, t % n


def max_tag(P, M, n):
    return 2 * P * M * n - 1

"""Pipeline schedules as data: per-rank action lists, built, lowered and validated by pure functions.

An action is (kind, mb, slice). Compute actions: F (forward of micro-batch mb, slice j) and
B (its backward). Lowering adds the messages: RECV_F/RECV_B are pre-posted receives (all at the
start of the step, in schedule order), SEND_F follows each F on a non-last stage, SEND_B each B
on a non-first stage, and REDUCE (the data-parallel gradient reduction) ends the list.
Strings round-trip: "F0.1", "SEND_B2.0", "REDUCE".

GPipe, p=2, M=2, n=2 (F0.1 = micro-batch 0, slice 1), one tick per action:

    tick  stage0  stage1
       0  F0.0    .
       1  F0.1    F0.0
       2  F1.0    F0.1
       ...
(docs/design.md#schedules-as-data)
"""

import re
from collections import namedtuple

COMPUTE = ("F", "B")
KINDS = ("F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "REDUCE")
FORWARD, BACKWARD = 0, 1


class ScheduleError(ValueError):
    """A schedule breaks an ordering, matching or progress rule."""


class Action(namedtuple("Action", "kind mb j")):
    __slots__ = ()

    def __str__(self):
        return self.kind if self.kind == "REDUCE" else f"{self.kind}{self.mb}.{self.j}"

    @staticmethod
    def parse(text):
        if text == "REDUCE":
            return REDUCE()
        m = re.fullmatch(r"(SEND_F|RECV_F|SEND_B|RECV_B|F|B)(\d+)\.(\d+)", text)
        if not m:
            raise ScheduleError(f"not an action: {text!r}")
        return Action(m.group(1), int(m.group(2)), int(m.group(3)))


def F(mb, j):
    return Action("F", mb, j)


def REDUCE():
    """The data-parallel gradient reduction that ends a training program (built only here)."""
    return Action("REDUCE", -1, -1)


def B(mb, j):
    return Action("B", mb, j)


def forward_units(M, n):
    return [(mb, j) for mb in range(M) for j in range(n)]


def backward_units(M, n):
    """Micro-batches in order, slices of each in reverse (the dK/dV accumulator needs it)."""
    return [(mb, j) for mb in range(M) for j in reversed(range(n))]


def gpipe(stage, p, M, n):
    """All forwards, then all backwards."""
    return [F(*u) for u in forward_units(M, n)] + [B(*u) for u in backward_units(M, n)]


def one_f_one_b(stage, p, M, n):
    """1F1B on (micro-batch, slice) units: a warm-up of forwards, then alternate F and B.

    The warm-up is n-1 units (the last stage must hold all slices of a micro-batch before its
    first backward) plus p-1-stage units (what is in flight downstream), so a stage keeps
    at most n+p-1-stage units of activations instead of all M·n. Like Megatron's
    non-interleaved 1F1B the warm-up is clamped to the M·n units there are, so any M works:
    with M·n ≤ n-1+p-1-stage the stage runs GPipe's order.
    """
    fw, bw = forward_units(M, n), backward_units(M, n)
    warm = min(len(fw), (n - 1) + (p - 1 - stage))
    out = [F(*u) for u in fw[:warm]]
    fi, bi = warm, 0
    while bi < len(bw):
        if fi < len(fw):
            out.append(F(*fw[fi]))
            fi += 1
        out.append(B(*bw[bi]))
        bi += 1
    return out


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b}


def lower(compute, stage, p, M, n, train=True):
    """Add pre-posted receives, sends after each compute action, and (train) the final REDUCE."""
    prog = []
    if stage > 0:
        prog += [Action("RECV_F", mb, j) for mb, j in forward_units(M, n)]
    if stage < p - 1 and train:
        prog += [Action("RECV_B", mb, j) for mb, j in backward_units(M, n)]
    for a in compute:
        prog.append(a)
        if a.kind == "F" and stage < p - 1:
            prog.append(Action("SEND_F", a.mb, a.j))
        if a.kind == "B" and stage > 0:
            prog.append(Action("SEND_B", a.mb, a.j))
    if train:
        prog.append(REDUCE())
    return prog


def build(name, p, M, n):
    """Per-stage lowered programs for schedule name; validated before they are returned."""
    progs = [lower(BUILDERS[name](s, p, M, n), s, p, M, n) for s in range(p)]
    validate(progs, M, n)
    return progs


def build_eval(p, M, n):
    """Forward-only programs (validation loss): every forward in order, lowered like a
    training program but without the final REDUCE."""
    progs = [lower([F(mb, j) for mb, j in forward_units(M, n)], s, p, M, n, train=False)
             for s in range(p)]
    simulate(progs)
    return progs


# ---------------------------------------------------------------------------------------------
# validation

def _check_rank(prog, s, p, M, n):
    where = f"stage {s}"
    seen = {}
    for i, a in enumerate(prog):
        if a in seen:
            raise ScheduleError(f"{where}: {a} appears twice (steps {seen[a]} and {i})")
        seen[a] = i
        if a.kind != "REDUCE" and not (0 <= a.mb < M and 0 <= a.j < n):
            raise ScheduleError(f"{where}: {a} out of range (M={M}, n={n})")
    for mb, j in forward_units(M, n):
        for k in ("F", "B"):
            if Action(k, mb, j) not in seen:
                raise ScheduleError(f"{where}: missing {Action(k, mb, j)}")
        f, b = seen[F(mb, j)], seen[B(mb, j)]
        if j > 0 and seen[F(mb, j - 1)] > f:
            raise ScheduleError(f"{where}: F{mb}.{j} before F{mb}.{j - 1}: forward slices "
                                f"must ascend")
        if j < n - 1 and seen[B(mb, j + 1)] > b:
            raise ScheduleError(f"{where}: B{mb}.{j} before B{mb}.{j + 1}: backward slices "
                                f"must descend")
        if b < seen[F(mb, n - 1)]:
            raise ScheduleError(f"{where}: B{mb}.{j} before F{mb}.{n - 1}: a micro-batch's "
                                f"backward needs all of its forward slices")
    for mb, j in forward_units(M, n):  # messages, once the compute order is known good
        need = ([("RECV_F", "F")] if s > 0 else []) + ([("RECV_B", "B")] if s < p - 1 else [])
        for rk, ck in need:
            r = seen.get(Action(rk, mb, j))
            if r is None or r > seen[Action(ck, mb, j)]:
                raise ScheduleError(f"{where}: {ck}{mb}.{j} has no receive posted before it")
        for sk, ck, ok in (("SEND_F", "F", s < p - 1), ("SEND_B", "B", s > 0)):
            snd = seen.get(Action(sk, mb, j))
            if ok and (snd is None or snd < seen[Action(ck, mb, j)]):
                raise ScheduleError(f"{where}: {sk}{mb}.{j} missing or before {ck}{mb}.{j}")
            if not ok and snd is not None:
                raise ScheduleError(f"{where}: {sk}{mb}.{j} has no peer stage")
    stray = [a for a in prog if (a.kind == "RECV_F" and s == 0) or
             (a.kind == "RECV_B" and s == p - 1)]
    if stray:
        raise ScheduleError(f"{where}: {stray[0]} has no peer stage")
    if prog.count(REDUCE()) != 1 or prog[-1].kind != "REDUCE":
        raise ScheduleError(f"{where}: REDUCE must come once, last")
    expect = 2 * M * n + 1 + M * n * ((s > 0) * 2 + (s < p - 1) * 2)
    if len(prog) != expect:
        raise ScheduleError(f"{where}: {len(prog)} actions, expected {expect}")


def validate(progs, M, n):
    """Check every rule of the module docstring, then that the programs cannot deadlock."""
    p = len(progs)
    for s, prog in enumerate(progs):
        _check_rank(prog, s, p, M, n)
    simulate(progs)


def simulate(progs, f_cost=1, b_cost=1):
    """Tick-by-tick execution with unit costs; returns per-stage lists of (start, action).

    Sends complete at once (receives are pre-posted); an F waits for SEND_F of the stage
    before it, a B for SEND_B of the stage after it. Raises ScheduleError on a deadlock.
    """
    p = len(progs)
    pc = [0] * p
    busy_until = [0] * p
    sent = {}  # (kind, mb, j, from_stage) -> tick the data is available
    timeline = [[] for _ in range(p)]
    t = 0
    while any(pc[s] < len(progs[s]) for s in range(p)):
        progressed = True
        while progressed:  # settle all sends and posts of this tick before anything starts
            progressed = False
            for s in range(p):
                while pc[s] < len(progs[s]) and busy_until[s] <= t:
                    a = progs[s][pc[s]]
                    if a.kind in ("SEND_F", "SEND_B"):
                        sent[(a.kind, a.mb, a.j, s)] = busy_until[s]
                    elif a.kind not in ("RECV_F", "RECV_B", "REDUCE"):
                        break
                    pc[s] += 1
                    progressed = True
        started = False
        for s in range(p):
            if pc[s] >= len(progs[s]) or busy_until[s] > t:
                continue
            a = progs[s][pc[s]]
            dep = (("SEND_F", a.mb, a.j, s - 1) if a.kind == "F" and s > 0 else
                   ("SEND_B", a.mb, a.j, s + 1) if a.kind == "B" and s < p - 1 else None)
            if dep is not None and sent.get(dep, t + 1) > t:
                continue
            timeline[s].append((t, a))
            busy_until[s] = t + (f_cost if a.kind == "F" else b_cost)
            pc[s] += 1
            started = True
        if not started and all(busy_until[s] <= t for s in range(p)) and \
                any(pc[s] < len(progs[s]) for s in range(p)):
            stuck = [str(progs[s][pc[s]]) for s in range(p) if pc[s] < len(progs[s])]
            raise ScheduleError(f"deadlock at tick {t}: stages wait on {', '.join(stuck)}\n"
                                + table(progs, upto=timeline))
        t += 1
    return timeline


def table(progs, upto=None, f_cost=1, b_cost=1):
    """The step × rank table: one row per tick, the compute action each stage runs ('.' = idle)."""
    timeline = upto if upto is not None else simulate(progs, f_cost, b_cost)
    cells = {}
    for s, tl in enumerate(timeline):
        for t, a in tl:
            for d in range(f_cost if a.kind == "F" else b_cost):
                cells[(t + d, s)] = str(a)
    end = max([t for t, _ in cells] + [-1]) + 1
    p = len(timeline)
    lines = ["tick " + " ".join(f"stage{s:<3d}" for s in range(p))]
    for t in range(end):
        lines.append(f"{t:4d} " + " ".join(f"{cells.get((t, s), '.'):8s}" for s in range(p)))
    return "\n".join(lines)


def tag(direction, mb, j, M, n):
    """Message tag for (direction, micro-batch, slice): unique within a step."""
    return (direction * M + mb) * n + j


def untag(t, M, n):
    """Inverse of tag(): (direction, mb, j)."""
    return t // (M * n), (t // n) % M, t % n


def max_tag(M, n):
    return 2 * M * n - 1

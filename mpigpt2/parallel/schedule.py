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

COMPUTE = ("F", "B", "I", "W")
KINDS = ("F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "REDUCE")
BACKWARD_KINDS = ("B", "I")  # the actions that send the input gradient upstream
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
        m = re.fullmatch(r"(SEND_F|RECV_F|SEND_B|RECV_B|F|B|I|W)(\d+)\.(\d+)", text)
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


def I(mb, j):  # noqa: E743 (the zero-bubble papers' name)
    return Action("I", mb, j)


def W(mb, j):
    return Action("W", mb, j)


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


def zb_h1(p, M, n):
    """ZB-H1 (Qi et al., zero-bubble pipeline parallelism) on (micro-batch, slice) units: 1F1B
    with each B split into I and W, the Ws deferred into what would be bubbles.

    Built by list scheduling on unit costs (F = I = W = 1): at every tick a free stage runs
    the next I if its gradient has arrived (I keeps the pipeline's critical path moving),
    else the next F if its input has arrived and fewer than 1F1B's peak units are alive
    (F done, W not yet: W frees the activations; the bound is 1F1B's peak, n+p-1 units on
    stage 0, here on every stage), else its oldest pending W. Returns every stage's compute
    list (a joint builder). With unit costs this reaches the paper's step of 3·M + p - 1
    ticks at M = p, n = 1, is shorter than 1F1B's everywhere tested and within 2(p-1) ticks
    of that formula (tests/unit/test_schedule.py)."""
    fw, bw = forward_units(M, n), backward_units(M, n)
    limit = [min(M * n, n + p - 1)] * p
    nf, nb, alive = [0] * p, [0] * p, [0] * p
    pending = [[] for _ in range(p)]
    f_done, i_done = {}, {}  # (stage, unit) -> tick it finished
    out = [[] for _ in range(p)]
    t = 0
    while any(len(o) < 3 * M * n for o in out):
        for s in range(p):
            if out[s] and _busy(out[s], t):
                continue
            a = _zb_pick(s, p, n, t, fw, bw, nf, nb, alive, limit, pending, f_done, i_done)
            if a is None:
                continue
            out[s].append((t, a))
        t += 1
    return [[a for _, a in o] for o in out]


def _busy(timed, t):
    return timed[-1][0] + 1 > t  # every action lasts one tick


def _zb_pick(s, p, n, t, fw, bw, nf, nb, alive, limit, pending, f_done, i_done):
    """The action stage s starts at tick t (see zb_h1), with its bookkeeping; or None."""
    if nb[s] < len(bw):
        mb, j = bw[nb[s]]
        own = f_done.get((s, (mb, n - 1)), t + 1) <= t
        grad = s == p - 1 or i_done.get((s + 1, (mb, j)), t + 1) <= t
        if own and grad:
            nb[s] += 1
            i_done[s, (mb, j)] = t + 1
            pending[s].append((mb, j))
            return I(mb, j)
    if nf[s] < len(fw) and alive[s] < limit[s]:
        u = fw[nf[s]]
        if s == 0 or f_done.get((s - 1, u), t + 1) <= t:
            nf[s] += 1
            alive[s] += 1
            f_done[s, u] = t + 1
            return F(*u)
    if pending[s]:
        alive[s] -= 1
        return W(*pending[s].pop(0))
    return None


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b}
JOINT_BUILDERS = {"zb-h1": zb_h1}  # built for all stages at once


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
        if a.kind in BACKWARD_KINDS and stage > 0:
            prog.append(Action("SEND_B", a.mb, a.j))
    if train:
        prog.append(REDUCE())
    return prog


def build(name, p, M, n):
    """Per-stage lowered programs for schedule name (a builder's name or a .csv file);
    validated before they are returned."""
    if name in JOINT_BUILDERS:
        compute = JOINT_BUILDERS[name](p, M, n)
    elif name in BUILDERS:
        compute = [BUILDERS[name](s, p, M, n) for s in range(p)]
    else:  # a schedule file (parallel/schedule_file.py)
        from mpigpt2.parallel import schedule_file
        compute = schedule_file.compute_lists(schedule_file.read_rows(name), p, M, n)
    progs = [lower(c, s, p, M, n) for s, c in enumerate(compute)]
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
    back = {}  # unit -> the action that computes its input gradient (B or I)
    for mb, j in forward_units(M, n):
        back[mb, j] = _check_unit(seen, where, mb, j)
    for mb, j in forward_units(M, n):
        b = seen[back[mb, j]]
        if j > 0 and seen[F(mb, j - 1)] > seen[F(mb, j)]:
            raise ScheduleError(f"{where}: F{mb}.{j} before F{mb}.{j - 1}: forward slices "
                                f"must ascend")
        if j < n - 1 and seen[back[mb, j + 1]] > b:
            raise ScheduleError(f"{where}: {back[mb, j]} before {back[mb, j + 1]}: backward "
                                f"slices must descend")
        if b < seen[F(mb, n - 1)]:
            raise ScheduleError(f"{where}: {back[mb, j]} before F{mb}.{n - 1}: a micro-batch's "
                                f"backward needs all of its forward slices")
    for mb, j in forward_units(M, n):  # messages, once the compute order is known good
        need = ([("RECV_F", F(mb, j))] if s > 0 else []) + \
            ([("RECV_B", back[mb, j])] if s < p - 1 else [])
        for rk, c in need:
            r = seen.get(Action(rk, mb, j))
            if r is None or r > seen[c]:
                raise ScheduleError(f"{where}: {c} has no receive posted before it")
        for sk, c, ok in (("SEND_F", F(mb, j), s < p - 1), ("SEND_B", back[mb, j], s > 0)):
            snd = seen.get(Action(sk, mb, j))
            if ok and (snd is None or snd < seen[c]):
                raise ScheduleError(f"{where}: {sk}{mb}.{j} missing or before {c}")
            if not ok and snd is not None:
                raise ScheduleError(f"{where}: {sk}{mb}.{j} has no peer stage")
    stray = [a for a in prog if (a.kind == "RECV_F" and s == 0) or
             (a.kind == "RECV_B" and s == p - 1)]
    if stray:
        raise ScheduleError(f"{where}: {stray[0]} has no peer stage")
    if prog.count(REDUCE()) != 1 or prog[-1].kind != "REDUCE":
        raise ScheduleError(f"{where}: REDUCE must come once, last")
    split = sum(back[u].kind == "I" for u in back)
    expect = 2 * M * n + split + 1 + M * n * ((s > 0) * 2 + (s < p - 1) * 2)
    if len(prog) != expect:
        raise ScheduleError(f"{where}: {len(prog)} actions, expected {expect}")


def _check_unit(seen, where, mb, j):
    """A unit has its F and either B or both I and W, W after I; returns B or I."""
    f, b, i, w = (Action(k, mb, j) for k in ("F", "B", "I", "W"))
    if f not in seen:
        raise ScheduleError(f"{where}: missing {f}")
    if b in seen and (i in seen or w in seen):
        raise ScheduleError(f"{where}: {b} and {i if i in seen else w} both given: a unit's "
                            f"backward is either B or I and W")
    if b in seen:
        return b
    if i not in seen and w not in seen:
        raise ScheduleError(f"{where}: missing {b} (or {i} and {w})")
    if i not in seen or w not in seen:
        raise ScheduleError(f"{where}: missing {w if i in seen else i}: I and W come in pairs")
    if seen[w] < seen[i]:
        raise ScheduleError(f"{where}: {w} before {i}: a weight gradient needs its input "
                            f"gradient's pass first")
    return i


def validate(progs, M, n):
    """Check every rule of the module docstring, then that the programs cannot deadlock."""
    p = len(progs)
    for s, prog in enumerate(progs):
        _check_rank(prog, s, p, M, n)
    simulate(progs)


def cost_of(kind, f_cost=1, b_cost=1, i_cost=1, w_cost=1):
    return {"F": f_cost, "B": b_cost, "I": i_cost, "W": w_cost}[kind]


def simulate(progs, f_cost=1, b_cost=1, i_cost=1, w_cost=1):
    """Tick-by-tick execution with integer costs per kind; returns per-stage lists of
    (start, action).

    Sends complete at once (receives are pre-posted); an F waits for SEND_F of the stage
    before it, a B or I for SEND_B of the stage after it; a W waits for nothing (its I came
    before it on the same stage). Raises ScheduleError on a deadlock.
    """
    costs = dict(f_cost=f_cost, b_cost=b_cost, i_cost=i_cost, w_cost=w_cost)
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
                   ("SEND_B", a.mb, a.j, s + 1) if a.kind in BACKWARD_KINDS and s < p - 1
                   else None)
            if dep is not None and sent.get(dep, t + 1) > t:
                continue
            timeline[s].append((t, a))
            busy_until[s] = t + cost_of(a.kind, **costs)
            pc[s] += 1
            started = True
        if not started and all(busy_until[s] <= t for s in range(p)) and \
                any(pc[s] < len(progs[s]) for s in range(p)):
            stuck = [str(progs[s][pc[s]]) for s in range(p) if pc[s] < len(progs[s])]
            raise ScheduleError(f"deadlock at tick {t}: stages wait on {', '.join(stuck)}\n"
                                + table(progs, upto=timeline))
        t += 1
    return timeline


def table(progs, upto=None, **costs):
    """The step × rank table: one row per tick, the compute action each stage runs ('.' = idle).
    costs: f_cost, b_cost, i_cost, w_cost as for simulate."""
    timeline = upto if upto is not None else simulate(progs, **costs)
    cells = {}
    for s, tl in enumerate(timeline):
        for t, a in tl:
            for d in range(cost_of(a.kind, **costs)):
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

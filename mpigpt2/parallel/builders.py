"""Schedule builders (pure): each takes a Pipe (parallel/schedule.py) and returns every rank's
compute list over (stage, micro-batch, slice) units; schedule.build lowers and validates them.
The tables and bubbles of each are in docs/design.md#schedules-as-data and the README.
"""

from mpigpt2.parallel.schedule import (F, B, I, W, ScheduleError, forward_units,
                                       backward_units, lower, simulate)


def _single(pipe, name):
    if pipe.P != pipe.p:
        raise ScheduleError(f"{name} runs one stage per rank; with virtual stages choose "
                            f"interleaved-1f1b, looped-bfs, zb-h1 or zb-v")


def gpipe(pipe):
    """All forwards, then all backwards."""
    _single(pipe, "gpipe")
    fw, bw = forward_units(pipe.M, pipe.n), backward_units(pipe.M, pipe.n)
    return [[F(r, *u) for u in fw] + [B(r, *u) for u in bw] for r in range(pipe.p)]


def one_f_one_b(pipe):
    """1F1B on (micro-batch, slice) units: a warm-up of forwards, then alternate F and B.

    The warm-up is n-1 units (the last stage must hold all slices of a micro-batch before its
    first backward) plus p-1-r units (what is in flight downstream), so rank r keeps at most
    n+p-1-r units of activations instead of all M·n. Like Megatron's non-interleaved 1F1B
    the warm-up is clamped to the M·n units there are, so any M works: with
    M·n ≤ n-1+p-1-r the rank runs GPipe's order.
    """
    _single(pipe, "1f1b")
    p, n = pipe.p, pipe.n
    fw, bw = forward_units(pipe.M, n), backward_units(pipe.M, n)
    return [_alternate([(r, u) for u in fw], [(r, u) for u in bw],
                       min(len(fw), (n - 1) + (p - 1 - r))) for r in range(p)]


def _alternate(fw, bw, warm, n=None):
    """warm forwards, then one forward and one backward in turn, then the backwards left.
    With n given, a backward whose micro-batch's last forward slice on its stage has not
    been issued yet waits: another forward is issued first (interleaved orders whose groups
    of p units straddle micro-batches)."""
    out = [F(s, *u) for s, u in fw[:warm]]
    issued = {(s, u) for s, u in fw[:warm]}
    fi = warm
    for s, u in bw:
        if fi < len(fw):
            out.append(F(fw[fi][0], *fw[fi][1]))
            issued.add(fw[fi])
            fi += 1
        while n is not None and (s, (u[0], n - 1)) not in issued:
            out.append(F(fw[fi][0], *fw[fi][1]))
            issued.add(fw[fi])
            fi += 1
        out.append(B(s, *u))
    return out


def _virtual_order(units, stages, g, reverse):
    """Megatron's interleaved order of (stage, unit): units in groups of g, each group
    through every chunk of the rank (chunks descending for the backward)."""
    chunks = list(reversed(stages)) if reverse else list(stages)
    out = []
    for a in range(0, len(units), g):
        out += [(s, u) for s in chunks for u in units[a:a + g]]
    return out


def interleaved_1f1b(pipe):
    """Megatron's interleaved 1F1B over the loop placement (rank r holds stages r, r+p, …):
    forwards of a group of units at a time through each chunk in turn, a warm-up long enough
    for the last stage to hold its first micro-batch's slices and for what is in flight,
    then 1F1B. A group is p units (Megatron's p micro-batches when n = 1), rounded up to
    whole micro-batches (n·⌈p/n⌉ units) so no group ends inside a micro-batch; a short last
    group is allowed where the orders stay consistent (Megatron wants M a multiple of p). Bubble (p-1)/(v·M·n + p-1) of the step with equal
    costs when n divides p or p divides n (tests/unit/test_schedule.py)."""
    p, n, v = pipe.p, pipe.n, pipe.v
    if pipe.placement != tuple(s % p for s in range(p * v)):
        raise ScheduleError("interleaved-1f1b needs the loop placement (rank r holds stages "
                            "r, r+p, …)")
    per = -(-p // n)  # micro-batches per group
    fw, bw = forward_units(pipe.M, n), backward_units(pipe.M, n)
    order_f = [_virtual_order(fw, pipe.stages(r), per * n, False) for r in range(p)]
    order_b = [_virtual_order(bw, pipe.stages(r), per * n, True) for r in range(p)]
    # the first backward of the last stage needs that stage's forward of (0, n-1)
    first = order_f[p - 1].index((pipe.P - 1, (0, n - 1)))
    out = [_alternate(order_f[r], order_b[r], min(len(order_f[r]), first + 2 * (p - 1 - r)), n)
           for r in range(p)]
    try:  # a short last group can leave the ranks' orders inconsistent (p 4, v 3, M 5)
        simulate([lower(c, r, pipe) for r, c in enumerate(out)])
    except ScheduleError:
        raise ScheduleError(f"interleaved-1f1b cannot order M = {pipe.M} micro-batches of "
                            f"{n} slices over pp {p} × {pipe.v} chunks; use a multiple of "
                            f"{per} micro-batches (whole groups of {per * n} units)") from None
    return out


def looped_bfs(pipe):
    """Looped BFS (torch's ScheduleLoopedBFS) over the loop placement: every forward of a
    rank's first chunk, then of its next, …; then the backwards, last chunk first. GPipe's
    memory (all units alive), fewer idle ticks than GPipe as chunks overlap."""
    fw, bw = forward_units(pipe.M, pipe.n), backward_units(pipe.M, pipe.n)
    return [[F(s, *u) for s in pipe.stages(r) for u in fw] +
            [B(s, *u) for s in reversed(pipe.stages(r)) for u in bw] for r in range(pipe.p)]


def zb_h1(pipe):
    """ZB-H1 (Qi et al., zero-bubble pipeline parallelism) on (micro-batch, slice) units: 1F1B
    with each B split into I and W, the Ws deferred into what would be bubbles; with virtual
    stages (loop placement) the interleaved zero-bubble schedule. See zero_bubble()."""
    if pipe.placement != tuple(s % pipe.p for s in range(pipe.P)):
        raise ScheduleError("zb-h1 needs the loop placement (rank r holds stages r, r+p, …)")
    return zero_bubble(pipe)


def zb_v(pipe):
    """ZB-V (Qi et al. 2024) on (micro-batch, slice) units: the V placement (rank r holds
    stages r and 2p-1-r) with I before F before W, as zero_bubble() builds it."""
    p = pipe.p
    if pipe.placement != tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p)):
        raise ScheduleError("zb-v needs --virtual-stages 2 and the V placement (rank r holds "
                            "stages r and 2p-1-r)")
    return zero_bubble(pipe)


def zero_bubble(pipe):
    """List scheduling on unit costs (F = I = W = 1): at every tick a free rank runs the next I
    whose gradient has arrived (the latest stage first: I is on the critical path), else the
    next F whose input has arrived (the latest stage first) while fewer than 1F1B's peak of
    alive units are held (F done, W not yet: W frees the activations; the bound is 1F1B's
    n+p-1 units of one stage's layers, v·(n+p-1) chunk units), else its oldest pending W.
    With one stage per rank this reaches the paper's ZB-H1 step of 3·M + p - 1 ticks at
    M = p, n = 1 and is shorter than 1F1B's everywhere tested (tests/unit/test_schedule.py)."""
    p, M, n = pipe.p, pipe.M, pipe.n
    fw, bw = forward_units(M, n), backward_units(M, n)
    st = _ZBState(pipe, fw, bw, min(pipe.v * M * n, pipe.v * (n + p - 1)))
    t = 0
    while any(len(o) < 3 * M * n * pipe.v for o in st.out):
        for r in range(p):
            if st.out[r] and st.out[r][-1][0] + 1 > t:
                continue  # busy: every action lasts one tick
            a = st.pick(r, t)
            if a is not None:
                st.out[r].append((t, a))
        t += 1
        if t > 10 * (3 * M * n * pipe.v + pipe.P):
            raise ScheduleError("zero-bubble list scheduling made no progress")  # a bug guard
    return [[a for _, a in o] for o in st.out]


class _ZBState:
    """The bookkeeping of zero_bubble(): per stage the next F and I unit, per rank the
    alive count and pending Ws, and when each (stage, unit) F and I finished."""

    def __init__(self, pipe, fw, bw, limit):
        self.pipe, self.fw, self.bw, self.limit = pipe, fw, bw, limit
        self.nf, self.nb = [0] * pipe.P, [0] * pipe.P
        self.alive, self.pending = [0] * pipe.p, [[] for _ in range(pipe.p)]
        self.f_done, self.i_done = {}, {}
        self.out = [[] for _ in range(pipe.p)]

    def pick(self, r, t):
        pipe, n = self.pipe, self.pipe.n
        mine = sorted(pipe.stages(r), reverse=True)
        for s in mine:
            if self.nb[s] < len(self.bw):
                mb, j = self.bw[self.nb[s]]
                own = self.f_done.get((s, (mb, n - 1)), t + 1) <= t
                grad = s == pipe.P - 1 or self.i_done.get((s + 1, (mb, j)), t + 1) <= t
                if own and grad:
                    self.nb[s] += 1
                    self.i_done[s, (mb, j)] = t + 1
                    self.pending[r].append((s, mb, j))
                    return I(s, mb, j)
        if self.alive[r] < self.limit:
            for s in mine:
                if self.nf[s] < len(self.fw):
                    u = self.fw[self.nf[s]]
                    if s == 0 or self.f_done.get((s - 1, u), t + 1) <= t:
                        self.nf[s] += 1
                        self.alive[r] += 1
                        self.f_done[s, u] = t + 1
                        return F(s, *u)
        if self.pending[r]:
            self.alive[r] -= 1
            return W(*self.pending[r].pop(0))
        return None


BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved-1f1b": interleaved_1f1b,
            "looped-bfs": looped_bfs, "zb-h1": zb_h1, "zb-v": zb_v}
# the placement each schedule runs on: loop (rank r holds r, r+p, …) or v (r and 2p-1-r)
PLACEMENT = {"gpipe": "loop", "1f1b": "loop", "interleaved-1f1b": "loop", "looped-bfs": "loop",
             "zb-h1": "loop", "zb-v": "v"}

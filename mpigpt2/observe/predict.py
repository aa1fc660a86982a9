"""The predicted timeline of a traced step: the schedule simulated with the step's measured
compute durations (docs/design.md#predicted-and-measured-bubble). trace.merge writes it into
trace.json (pid 1, "predicted"), and `report` draws it under the measured timeline; both call
predict_step, so the picture and the file agree."""

from mpigpt2.parallel import costs
from mpigpt2.parallel.schedule import Action, ScheduleError

COMPUTE_CATS = ("forward", "backward")


def predict_step(spans, where):
    """spans: {world rank: [(action name, start µs, duration µs)]} the compute spans of one
    step, in the order each rank ran them; where: {world rank: (pipe rank, replica)}.

    Returns ({world rank: [(action name, start µs, duration µs)]} predicted, {replica:
    (measured µs, predicted µs)} of the pipelined part): each replica's schedule simulated
    with the measured durations, starting where its first measured compute started. None if
    the spans are not a whole schedule (names that are not actions, a rank missing)."""
    out, spans_of = {}, {}
    replicas = {}
    for w, (q, rep) in where.items():
        replicas.setdefault(rep, {})[q] = w
    try:
        for rep, ranks in replicas.items():
            if sorted(ranks) != list(range(len(ranks))) or any(w not in spans
                                                              for w in ranks.values()):
                return None
            progs, seconds = [], {}
            for q in range(len(ranks)):
                acts = [Action.parse(name) for name, _, _ in spans[ranks[q]]]
                seconds.update({a: d / 1e6 for a, (_, _, d) in zip(acts, spans[ranks[q]])})
                progs.append(acts)
            timeline, end, _ = costs.measured_pipeline(progs, seconds)
            t0 = min(t for w in ranks.values() for _, t, _ in spans[w])
            t1 = max(t + d for w in ranks.values() for _, t, d in spans[w])
            for q, tl in enumerate(timeline):
                out[ranks[q]] = [(str(a), t0 + t * 1e6, seconds[a] * 1e6) for t, a in tl]
            spans_of[rep] = (t1 - t0, end * 1e6)
    except (ScheduleError, KeyError):
        return None
    return out, spans_of


def chrome_events(per_rank):
    """Predicted timelines of every traced step as Chrome events on pid 1, one track per
    rank. per_rank: [((rank, pipe rank, replica), chrome events of that rank)]."""
    where = {rank: (q, rep) for (rank, q, rep), _ in per_rank}
    steps = {}
    for (rank, _, _), evs in per_rank:
        for e in evs:
            if e["ph"] == "X" and e["cat"] in COMPUTE_CATS and e["args"].get("step", -1) >= 0:
                steps.setdefault(e["args"]["step"], {}).setdefault(rank, []).append(
                    (e["name"], e["ts"], e["dur"], e["cat"]))
    out = []
    for step, ranks in sorted(steps.items()):
        cats = {(r, name): cat for r, xs in ranks.items() for name, _, _, cat in xs}
        got = predict_step({r: [x[:3] for x in sorted(xs, key=lambda x: x[1])]
                            for r, xs in ranks.items()}, where)
        if got is None:
            continue
        for rank, xs in got[0].items():
            out += [{"name": name, "cat": cats[rank, name], "ph": "X", "pid": 1, "tid": rank,
                     "ts": round(t, 3), "dur": round(d, 3), "args": {"step": step}}
                    for name, t, d in xs]
    return out

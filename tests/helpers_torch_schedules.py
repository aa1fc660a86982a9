"""Schedule files written by torch.distributed.pipelining itself (the oracle for our CSV
reader): torch's builders run on a stand-in object (v stages per rank, placed as torch places
them: loop, or V for ScheduleZBVZeroBubble and ScheduleDualPipeV), and torch's own _dump_csv
writes the file. Needs torch (a test extra)."""

V_SHAPED = ("ScheduleZBVZeroBubble", "ScheduleDualPipeV")


def torch_placement(name, p, v=1):
    """The rank of each stage in torch's schedule `name`."""
    if name in V_SHAPED:
        return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))
    return tuple(s % p for s in range(p * v))


def torch_schedule_csv(path, name, p, M, v=1):
    from torch.distributed.pipelining import schedules as ts
    cls = getattr(ts, name)
    s = object.__new__(cls)  # (no process group or modules: only the order is computed)
    placement = torch_placement(name, p, v)
    s.pp_group_size, s.n_local_stages, s._n_microbatches = p, len(placement) // p, M
    s._num_stages = s.num_stages = len(placement)
    s._stages = [None] * s.n_local_stages
    s.number_of_rounds = max(1, M // p)
    s.microbatches_per_round = M // s.number_of_rounds
    s.stage_index_to_group_rank = dict(enumerate(placement))
    s.pipeline_order = {r: s._calculate_single_rank_operations(r) for r in range(p)}
    if hasattr(s, "_add_bubbles_to_actions"):
        s.pipeline_order = s._add_bubbles_to_actions(len(placement))
    ts.PipelineScheduleMulti._dump_csv(s, str(path))
    return path

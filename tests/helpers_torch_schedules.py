"""Schedule files written by torch.distributed.pipelining itself (the oracle for our CSV
reader): torch's builders run on a stand-in object with one stage per rank, and torch's own
_dump_csv writes the file. Needs torch (a test extra)."""


def torch_schedule_csv(path, name, p, M):
    from torch.distributed.pipelining import schedules as ts
    cls = getattr(ts, name)
    s = object.__new__(cls)  # (no process group or modules: only the order is computed)
    s.pp_group_size, s.n_local_stages, s._n_microbatches, s._num_stages = p, 1, M, p
    s.number_of_rounds = max(1, M // p)
    s.microbatches_per_round = M // s.number_of_rounds
    s.stage_index_to_group_rank = {i: i for i in range(p)}
    s.pipeline_order = {r: s._calculate_single_rank_operations(r) for r in range(p)}
    if hasattr(s, "_add_bubbles_to_actions"):
        s.pipeline_order = s._add_bubbles_to_actions(p)
    ts.PipelineScheduleMulti._dump_csv(s, str(path))
    return path

"""Schedules from files (issue 13): torch.distributed.pipelining's CSV format. Files written by
torch's own builders load, validate and simulate; every malformed file is refused with one
line naming the row, column and cell, before any compute."""

import pytest

from helpers_torch_schedules import torch_schedule_csv
from mpigpt2.base.errors import UserError
from mpigpt2.model.config import PRESETS
from mpigpt2.parallel import schedule as S
from mpigpt2.parallel.layout import resolve
from mpigpt2.parallel.schedule_file import compute_lists, read_rows


@pytest.mark.parametrize("name", ["ScheduleInterleavedZeroBubble", "ScheduleInterleaved1F1B"])
@pytest.mark.parametrize("p,M,n", [(2, 4, 1), (2, 4, 4), (4, 4, 2), (4, 8, 1)])
def test_torch_written_files_load(tmp_path, name, p, M, n):
    path = torch_schedule_csv(tmp_path / "s.csv", name, p, M)
    progs = S.build(str(path), p, M, n)  # validated and simulated inside
    split = name.endswith("ZeroBubble")
    for prog in progs:
        kinds = [a.kind for a in prog]
        assert kinds.count("F") == M * n
        assert kinds.count("W") == (M * n if split else 0)
        assert kinds.count("B") == (0 if split else M * n)


def test_slices_expand_in_the_accumulator_order(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("0F0,,0B0\n,1F0,1B0\n")
    rows = read_rows(path)
    placement, lists = compute_lists(rows, 2, 1, 3)
    assert placement == (0, 1)
    assert [str(a) for a in lists[0]] == ["0F0.0", "0F0.1", "0F0.2", "0B0.2", "0B0.1", "0B0.0"]


def test_b_then_w_means_input_then_weight_and_overlap_runs_in_order(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("0F0,0F1,0SEND_F0,,0B0,(0B1;0W0)OVERLAP_F_B,0W1\n"
                    ",1F0,1I0,1F1,1I1,1W0,1W1\n")
    progs = S.build(str(path), 2, 2, 1)
    assert [str(a) for a in progs[0] if a.kind in "FIWB"] == \
        ["0F0.0", "0F1.0", "0I0.0", "0I1.0", "0W0.0", "0W1.0"]


@pytest.mark.parametrize("text,message", [
    ("0F0,0X0\n,1F0\n", "row 1 (rank 0), column 2: '0X0' is not an action"),
    ("0F0,,0B0\n,2F0,2B0\n", "stage 1 appears in no row"),
    ("0F0,,0B0\n", "1 rank rows, the layout has pp = 2"),
    ("0F0,,0B0\n,1F0,1B0\n,2F0,2B0\n", "3 rank rows"),
    ("0F0,0F3,0B0,0B3\n,1F0,1B0,1F3,1B3\n", "micro-batch 3 ≥ M = 2"),
    ("0F0,,0W0,0I0\n,1F0,1I0,1W0\n", "a W before its I"),
    ("0F0,(0F1;0SEND_F1)OVERLAP_F_B,0B0,0B1\n,1F0,1B0,1F1,1B1\n", "compute actions only"),
    ("0F0,(0F1;0B0)OVERLAP_X,0B1\n,1F0,1B0,1F1,1B1\n", "is not '(a;b)OVERLAP_F_B'"),
    ("0F0,,1B0\n,1F0,1B0\n", "'1F0' uses stage 1, which row 1 already uses"),
    ("0F0,,0B\n,1F0,1B0\n", "lacks its micro-batch index"),
    ("0F0,,0F1,0B1\n,1F0,1B0,1F1,1B1\n", "rank 0: missing 0B0.0 (or 0I0.0 and 0W0.0)"),
    ("0F0,0B0,0F1,0B1\n,1B0,1F0,1F1,1B1\n", "1B0.0 before 1F0.0"),
    ("0F0,0B0,0F1,0B1\n,1F0,1F1,1B0,1B1\n", "deadlock"),  # a cycle across the two ranks
])
def test_bad_files_are_refused_with_one_line(tmp_path, text, message):
    """A file that does not parse: one line naming row, column and cell. A file that breaks a
    schedule rule: that line first, then the step × rank table with the cell marked."""
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        resolve(2, PRESETS["gpt2-tiny"], 4, 32, pp=2, dp=1, microbatches=2, slice_tokens=32,
                schedule=str(path))
    first, *rest = str(e.value).splitlines()
    assert message in first, str(e.value)
    if rest:  # a rule: the table follows
        assert rest[0].startswith("step ") and "rank0" in rest[0], str(e.value)
        if "deadlock" not in first:
            marked = [c for line in rest for c in line.split() if c.startswith(">")]
            assert len(marked) == 1 and marked[0].strip("><") in first, str(e.value)


def test_missing_and_special_files(tmp_path):
    import os
    os.mkfifo(tmp_path / "fifo.csv")
    for path, message in ((tmp_path / "none.csv", "no such file"),
                          (tmp_path / "fifo.csv", "not a regular file")):
        with pytest.raises(UserError, match=message):
            resolve(2, PRESETS["gpt2-tiny"], 4, 32, pp=2, schedule=str(path))


@pytest.mark.parametrize("name,p,M,n,v", [("zb-h1", 2, 2, 4, 1), ("1f1b", 4, 2, 1, 1),
                                          ("gpipe", 3, 2, 2, 1), ("zb-h1", 4, 4, 1, 1),
                                          ("interleaved-1f1b", 2, 2, 2, 2), ("zb-v", 2, 1, 4, 2),
                                          ("looped-bfs", 2, 3, 1, 3), ("zb-h1", 2, 2, 2, 2)])
def test_written_files_read_back(tmp_path, name, p, M, n, v):
    """Our writer's files (torch's format at n = 1, slices otherwise) rebuild the same
    programs, virtual stages and their placement included."""
    from mpigpt2.parallel.schedule_file import write
    placement = S.v_placement(p) if name == "zb-v" else S.loop_placement(p, v)
    progs = S.build(name, p, M, n, placement)
    write(progs, tmp_path / "s.csv", n)
    if n == 1:
        assert "." not in (tmp_path / "s.csv").read_text()
    assert S.build(str(tmp_path / "s.csv"), p, M, n) == progs


@pytest.mark.parametrize("name,p,M,v", [("ScheduleInterleaved1F1B", 2, 4, 2),
                                        ("ScheduleInterleaved1F1B", 4, 8, 2),
                                        ("ScheduleInterleaved1F1B", 2, 6, 3),
                                        ("ScheduleInterleaved1F1B", 4, 12, 3)])
def test_interleaved_equals_torchs_interleaved_1f1b(tmp_path, name, p, M, v):
    """Our interleaved-1f1b is Megatron's order: with whole micro-batches (n = 1) each rank's
    F/B list equals the one torch's ScheduleInterleaved1F1B builds."""
    path = torch_schedule_csv(tmp_path / "s.csv", name, p, M, v)
    theirs = S.build(str(path), p, M, 1)
    ours = S.build("interleaved-1f1b", p, M, 1, S.loop_placement(p, v))
    for t, o in zip(theirs, ours):
        assert [a for a in t if a.kind in "FB"] == [a for a in o if a.kind in "FB"]


@pytest.mark.parametrize("name,p,M,v,n", [("ScheduleInterleavedZeroBubble", 2, 4, 2, 2),
                                          ("ScheduleInterleavedZeroBubble", 4, 4, 3, 1),
                                          ("ScheduleLoopedBFS", 2, 4, 2, 3),
                                          ("ScheduleZBVZeroBubble", 2, 4, 2, 2),
                                          ("ScheduleZBVZeroBubble", 4, 8, 2, 1),
                                          ("ScheduleDualPipeV", 2, 4, 2, 2),
                                          ("ScheduleDualPipeV", 4, 8, 2, 1)])
def test_torch_multi_stage_files_load(tmp_path, name, p, M, v, n):
    """Files with several stages per rank: the placement is read off the rows (loop, or V
    with the first and last stage on rank 0), every stage's units are complete."""
    from helpers_torch_schedules import torch_placement
    path = torch_schedule_csv(tmp_path / "s.csv", name, p, M, v)
    placement = compute_lists(read_rows(path), p, M, n)[0]
    assert placement == torch_placement(name, p, v)
    progs = S.build(str(path), p, M, n)
    for r, prog in enumerate(progs):
        for s in (q for q, rank in enumerate(placement) if rank == r):
            assert sum(a.kind == "F" and a.s == s for a in prog) == M * n

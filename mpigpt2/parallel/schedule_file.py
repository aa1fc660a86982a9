"""Schedules from files: torch.distributed.pipelining's CSV format (pure; docs/design.md#
schedules-as-data).

One row per rank, its actions in execution order, empty cells allowed. An action is
`<stage><kind><micro-batch>` (`2F0`, `1I3`, `0W1`, `1B0`), the communication actions
`SEND_F RECV_F SEND_B RECV_B` (`3SEND_F1`), the FSDP actions `UNSHARD RESHARD REDUCE_GRAD`, or
`(a;b)OVERLAP_F_B`, whose sub-actions run one after the other here. Communication and FSDP
actions are dropped: the compute order is lowered with our own receives and sends. A
micro-batch action stands for all n slices of it: F ascending, B and I descending, W in the
same descending order; our own notation `0F1.2` names one slice (micro-batch 1, slice 2). A
`B` followed later by a `W` of the same stage and micro-batch (older files) is the input
half. A rank may hold several stages (virtual stages): the placement is read off which
stages each row uses, each stage on exactly one row.
"""

import csv
import re

from mpigpt2.parallel.schedule import Action, ScheduleError

ACTION = re.compile(r"(\d+)(F|I|W|B|SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|REDUCE_GRAD)"
                    r"(\d*)(?:\.(\d+))?")
DROPPED = ("SEND_F", "RECV_F", "SEND_B", "RECV_B", "UNSHARD", "RESHARD", "REDUCE_GRAD")
MAX_BYTES = 1 << 24


def read_rows(path):
    """The CSV's rows of non-empty cells (text, stripped)."""
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read(MAX_BYTES + 1)
    if len(text) > MAX_BYTES:
        raise ScheduleError(f"{path}: larger than {MAX_BYTES} bytes; not a schedule file")
    return [[c.strip() for c in row] for row in csv.reader(text.splitlines())]


def parse_cell(cell, where):
    """(stage, kind, micro-batch) tuples of one cell (several for OVERLAP_F_B)."""
    m = re.fullmatch(r"\((.*)\)(\w+)", cell)
    if m:
        if m.group(2) != "OVERLAP_F_B" or not m.group(1).strip():
            raise ScheduleError(f"{where}: {cell!r} is not '(a;b)OVERLAP_F_B'")
        subs = [parse_cell(s.strip(), f"{where} (inside {cell!r})") for s in m.group(1).split(";")]
        if any(len(s) != 1 or s[0][1] not in "FIWB" for s in subs):
            raise ScheduleError(f"{where}: {cell!r}: OVERLAP_F_B holds compute actions only")
        return [s[0] for s in subs]
    m = ACTION.fullmatch(cell)
    if not m:
        raise ScheduleError(f"{where}: {cell!r} is not an action like 2F0, 1I3, 0W1, 1B0, "
                            f"3SEND_F1 or (0F1;1B0)OVERLAP_F_B")
    stage, kind, mb, j = m.groups()
    if kind in DROPPED:
        return []
    if not mb:
        raise ScheduleError(f"{where}: {cell!r} lacks its micro-batch index")
    return [(int(stage), kind, int(mb) if j is None else (int(mb), int(j)))]


def compute_lists(rows, p, M, n):
    """(placement, per-rank compute lists of our Actions, slices expanded) from the CSV rows:
    the rank of each stage is the row that uses it. Raises ScheduleError naming row, column
    and cell."""
    if len(rows) != p:
        raise ScheduleError(f"the file has {len(rows)} rank rows, the layout has pp = {p}")
    owner, out = {}, []
    for r, row in enumerate(rows):
        acts = []
        for c, cell in enumerate(row):
            if not cell:
                continue
            where = f"row {r + 1} (rank {r}), column {c + 1}"
            for stage, kind, mb in parse_cell(cell, where):
                if owner.setdefault(stage, (r, where, cell))[0] != r:
                    raise ScheduleError(f"{where}: {cell!r} uses stage {stage}, which row "
                                        f"{owner[stage][0] + 1} already uses "
                                        f"({owner[stage][1]}); a stage sits on one rank")
                m_, j_ = mb if isinstance(mb, tuple) else (mb, None)
                if m_ >= M or (j_ is not None and j_ >= n):
                    raise ScheduleError(f"{where}: {cell!r}: micro-batch {m_} ≥ M = {M}"
                                        if m_ >= M else f"{where}: {cell!r}: slice {j_} ≥ "
                                        f"n = {n}")
                acts.append((kind, stage, mb, where, cell))
        out.append(_expand(acts, n))
    P = max(owner, default=-1) + 1
    gaps = [s for s in range(P) if s not in owner]
    if gaps or P < p:
        s = gaps[0] if gaps else P
        raise ScheduleError(f"stage {s} appears in no row (stages must be numbered 0, 1, … and "
                            f"every rank hold one); the highest stage used is {P - 1}"
                            if gaps else f"the file uses {P} stages for pp = {p} ranks; every "
                            f"rank needs a stage")
    return tuple(owner[s][0] for s in range(P)), out


def _expand(acts, n):
    """Micro-batch actions to slice actions; a B with a later W of the same stage and
    micro-batch is I."""
    later_w = {}  # (stage, unit (a micro-batch, or (mb, slice))) -> index of its last W
    for i, (kind, stage, mb, _, _) in enumerate(acts):
        if kind == "W":
            later_w[stage, mb] = i
    done_i = set()
    out = []
    for i, (kind, stage, mb, where, cell) in enumerate(acts):
        if kind == "B" and later_w.get((stage, mb), -1) > i:
            kind = "I"
        if kind == "W" and (stage, mb) not in done_i:
            raise ScheduleError(f"{where}: {cell!r}: a W before its I (or B)")
        if kind == "I":
            done_i.add((stage, mb))
        if isinstance(mb, tuple):  # our notation: one slice
            out.append(Action(kind, stage, *mb))
            continue
        slices = range(n) if kind == "F" else reversed(range(n))
        out += [Action(kind, stage, mb, j) for j in slices]
    return out


def write(progs, path, n):
    """Write per-rank programs as a schedule file (atomically): torch's format when n = 1
    (`0F1`), else our notation with the slice (`0F1.2`); both read back by compute_lists."""
    from mpigpt2.formats.atomic import atomic_write_text
    rows = []
    for prog in progs:
        cells = [f"{a.s}{a.kind}{a.mb}" + (f".{a.j}" if n > 1 else "")
                 for a in prog if a.kind in ("F", "B", "I", "W")]
        rows.append(",".join(cells))
    atomic_write_text(path, "\n".join(rows) + "\n")

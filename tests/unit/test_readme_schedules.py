"""The README's schedule tables are what `--print-schedule` prints for the flags shown above
each (parsed from the README, laid out by the trainer's own option parser and layout)."""

import re
import shlex

import pytest

from helpers import REPO
from mpigpt2.model.config import PRESETS
from mpigpt2.options import parse_args
from mpigpt2.parallel import schedule as S
from mpigpt2.parallel.layout import resolve

BLOCK = re.compile(r"```\n\$ python -m mpigpt2\.train (.*?)   \(table part\)\n(.*?)```", re.S)


def blocks():
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_shows_every_schedule():
    names = {parse_args(shlex.split(flags)).schedule for flags, _ in blocks()}
    assert names == {"gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "looped-bfs", "zb-v"}


@pytest.mark.parametrize("flags,table", blocks(), ids=[f for f, _ in blocks()])
def test_table_matches_print_schedule(flags, table):
    a = parse_args(shlex.split(flags))
    lay = resolve(a.pp, PRESETS["gpt2-tiny"], a.batch_size, a.seq_len, a.pp, a.dp,
                  a.stage_layers, a.microbatches, a.slice_tokens, a.schedule,
                  virtual_stages=a.virtual_stages)
    want = "\n".join(line.rstrip() for line in S.table(lay.programs(a.seq_len)).splitlines())
    assert table.strip("\n") == want

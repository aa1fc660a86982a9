"""Checkpoint lineage (issue 12.1): resuming from an older checkpoint never loses a
checkpoint, pruning touches only the run's own lineage, and --resume auto never continues an
abandoned branch. Expectations come from the rule, not from earlier output: which steps each
run wrote, and that moved files are byte-identical to what was there before."""

import json
import shutil

from helpers import run, train_cmd

C = ("--sample-tokens", "0", "--val-data=", "--checkpoint-every", "1")


def train(shards, out, *extra):
    r = run(train_cmd(shards, out, *C, *extra))
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def files(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def steps(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("step_"))


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_from_older_checkpoint_keeps_the_abandoned_branch(tmp_path, shards):
    """The issue's reproduction: keep 1 after resuming from step 1 of a 3-step run."""
    out = tmp_path / "o"
    train(shards, out, "--steps", "3", "--keep-checkpoints", "0")
    old = files(out)
    r = train(shards, out, "--steps", "2", "--keep-checkpoints", "1", "--resume",
              str(out / "checkpoints/step_00000001"))
    assert "not in the resumed lineage" in r.stdout
    assert steps(out / "checkpoints") == ["step_00000002"]  # the new one; 1 pruned (its own)
    moved = files(out / "abandoned-1")
    for name in ("step_00000002", "step_00000003"):
        prefix = f"checkpoints/{name}/"
        assert {k: v for k, v in moved.items() if k.startswith(prefix)} == \
            {k: v for k, v in old.items() if k.startswith(prefix)}
    assert moved["metrics.jsonl"] == old["metrics.jsonl"]  # the branch's rows, as they were
    assert moved["config.json"] == old["config.json"]
    assert losses(out)[1] == losses(out / "abandoned-1")[1]  # same data, same weights


def test_resume_auto_never_picks_the_abandoned_branch(tmp_path, shards):
    out = tmp_path / "o"
    train(shards, out, "--steps", "3")  # default --keep-checkpoints 3: steps 1, 2, 3
    train(shards, out, "--steps", "2", "--resume", str(out / "checkpoints/step_00000001"),
          "--no-final-checkpoint", "--checkpoint-every", "0")  # writes nothing new
    assert steps(out / "checkpoints") == ["step_00000001"]
    assert steps(out / "abandoned-1/checkpoints") == ["step_00000002", "step_00000003"]
    r = train(shards, out, "--steps", "3", "--resume", "auto")
    assert "checkpoints/step_00000001 at step 1" in r.stdout, r.stdout


def test_resuming_an_abandoned_branch_sets_the_current_one_aside(tmp_path, shards):
    out = tmp_path / "o"
    train(shards, out, "--steps", "3", "--keep-checkpoints", "0")
    train(shards, out, "--steps", "3", "--keep-checkpoints", "0", "--resume",
          str(out / "checkpoints/step_00000001"))  # branch B: 2', 3'
    b = files(out / "checkpoints")
    train(shards, out, "--steps", "4", "--keep-checkpoints", "0", "--resume",
          str(out / "abandoned-1/checkpoints/step_00000003"))  # back to branch A
    assert steps(out / "checkpoints") == ["step_00000001", "step_00000004"]
    moved = files(out / "abandoned-2/checkpoints")
    assert moved == {k: v for k, v in b.items() if not k.startswith("step_00000001/")}


def test_pruning_never_touches_another_runs_checkpoints(tmp_path, shards):
    """Resuming a checkpoint from elsewhere into a directory holding another run's older
    checkpoints: they are moved aside, not pruned as if they were this run's."""
    other, out = tmp_path / "other", tmp_path / "o"
    train(shards, other, "--steps", "4", "--keep-checkpoints", "0")
    train(shards, out, "--steps", "2", "--keep-checkpoints", "0", "--seed", "7")
    mine = files(out / "checkpoints")
    train(shards, out, "--steps", "5", "--keep-checkpoints", "1", "--resume",
          str(other / "checkpoints/step_00000004"), "--seed", "7")
    assert steps(out / "checkpoints") == ["step_00000005"]
    assert files(out / "abandoned-1/checkpoints") == mine


def test_checkpoints_without_lineage_count_as_one_legacy_lineage(tmp_path, shards):
    """Checkpoints written before lineages existed (no "lineage" in state.json, DONE holding
    only the step) still resume, and later steps than the resumed one are set aside."""
    out = tmp_path / "o"
    train(shards, out, "--steps", "3", "--keep-checkpoints", "0")
    for d in (out / "checkpoints").iterdir():
        state = json.loads((d / "state.json").read_text())
        del state["lineage"]
        (d / "state.json").write_text(json.dumps(state))
        (d / "DONE").write_text(f"{state['step']}\n")
    train(shards, out, "--steps", "3", "--keep-checkpoints", "0", "--resume",
          str(out / "checkpoints/step_00000002"))
    assert steps(out / "abandoned-1/checkpoints") == ["step_00000003"]
    assert steps(out / "checkpoints") == ["step_00000001", "step_00000002", "step_00000003"]
    shutil.rmtree(out / "abandoned-1")

"""Exact resume of real training processes killed or preempted mid-run, on 1 and 2 ranks.

The bar is bitwise: every step's loss, grad norm and lr in metrics.jsonl, and the final fp32
weights, equal those of the uninterrupted run. After a world-size change the numbers agree to
float32 reduction-order noise (~1e-6), asserted at 1e-5.
"""

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.checkpoint import runs


def assert_bitwise(reference, resumed) -> None:
    expected, got = runs.losses(reference), runs.losses(resumed)
    assert sorted(got) == list(range(1, runs.MAX_STEPS + 1))
    for step in expected:
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"
    ref_weights, weights = runs.final_weights(reference), runs.final_weights(resumed)
    assert sorted(weights) == sorted(ref_weights)
    for name in ref_weights:
        assert torch.equal(weights[name], ref_weights[name]), name


def assert_interrupted(run_set) -> None:
    """The signal landed mid-run, and the run resumed from a checkpoint at or before it."""
    resumes = runs.events(run_set.cut, "resume")
    assert len(resumes) == 1
    assert 0 < resumes[0]["step"] <= run_set.signalled_at + 1
    if run_set.signal == signal.SIGKILL:
        assert run_set.returncode == -signal.SIGKILL
        return
    # a preemption saves at the next step boundary and exits as "preempted"
    preempt = runs.events(run_set.cut_copy, "preempt")
    assert [e["signal"] for e in preempt] == ["SIGTERM"]
    assert runs.summary(run_set.cut_copy)["status"] == "preempted"
    assert resumes[0]["step"] == preempt[0]["step"]


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_one_rank_resume_is_bitwise(training_runs, zero_stage):
    run_set = training_runs.get(zero_stage)
    assert_interrupted(run_set)
    if run_set.signal == signal.SIGTERM:
        assert run_set.returncode == 0
    assert_bitwise(run_set.reference, run_set.cut)
    assert runs.summary(run_set.cut)["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("form", ["adamw_indep", "adamp", "adam_spd"])
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_every_decay_form_resumes_bitwise(training_runs, zero_stage, form):
    """adam_spd's theta_0 too: it lives in the optimizer state, sharded like the weights."""
    run_set = training_runs.get(zero_stage, form=form)
    assert_interrupted(run_set)
    assert_bitwise(run_set.reference, run_set.cut)
    from checkpoint.manager import read_harness

    assert read_harness(newest_checkpoint(run_set.cut))["optimizer"]["name"] == form
    # the rule fired after the cut, so a lost or reset state (theta_0 for SPD) would show
    fired = {"adamp": ("adamp_proj_row", "adamp_proj_tensor"), "adam_spd": ("spd_decay_frac",)}
    lines = [json.loads(line) for line in (run_set.cut / "metrics.jsonl").read_text().splitlines()]
    after = [m for m in lines if m["step"] > runs.events(run_set.cut, "resume")[0]["step"]]
    if form in fired:
        assert any(m.get(key, 0) > 0 for m in after for key in fired[form])


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_weight_ema_resumes_bitwise(training_runs, zero_stage):
    """The EMA is saved with each checkpoint: its val loss after the cut is the uncut run's."""
    run_set = training_runs.get(zero_stage, form="ema")
    assert_interrupted(run_set)
    assert_bitwise(run_set.reference, run_set.cut)

    def evals(run_dir):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m for m in map(json.loads, lines) if "val_loss" in m}

    expected, got = evals(run_set.reference), evals(run_set.cut)
    assert sorted(got) == [3, 6, 8]
    for step, line in expected.items():
        assert got[step]["val_loss_ema"] == line["val_loss_ema"], step
        assert line["val_loss_ema"] != line["val_loss"]
    assert (newest_checkpoint(run_set.cut) / "ema.pt").is_file()


@pytest.mark.slow
def test_adam_spd_refuses_a_resume_on_another_world_size(training_runs, tmp_path):
    """DeepSpeed's universal checkpoint carries weights and moments, not theta_0."""
    run_set = training_runs.get(1, form="adam_spd")
    run_dir = tmp_path / "run"
    shutil.copytree(run_set.cut_copy, run_dir)
    start = runs.events(run_dir, "init_from")[0]["path"]
    extra = {**runs.FORM_EXTRA, "optim.name": "adam_spd", "optim.weight_decay": 0.5}
    extra["checkpoint.init_from"] = start
    result = runs.train(run_dir, 1, world_size=2, **extra)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors and all("universal checkpoint does not carry" in line for line in errors)
    assert runs.losses(run_dir) == runs.losses(run_set.cut_copy)  # nothing lost


@pytest.mark.slow
@pytest.mark.parametrize(("zero_stage", "form"), [(1, "adamw"), (3, "adamw"), (3, "adam_spd")])
def test_two_rank_resume_is_bitwise(training_runs, zero_stage, form):
    """torchrun: SIGTERM to the launcher (ZeRO 1), SIGKILL to every process (ZeRO 3)."""
    run_set = training_runs.get(zero_stage, world_size=2, form=form)
    assert_interrupted(run_set)
    if run_set.signal == signal.SIGTERM:  # torchrun exits 1 once signalled; the summary is right
        assert run_set.returncode == 1
    assert_bitwise(run_set.reference, run_set.cut)


def assert_close(reference, resumed, from_world_size: int) -> None:
    expected, got = runs.losses(reference), runs.losses(resumed)
    resume = runs.events(resumed, "resume")[-1]
    assert resume["from_world_size"] == from_world_size and resume["universal"]
    assert sorted(got) == list(range(1, runs.MAX_STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), step
    ref_weights, weights = runs.final_weights(reference), runs.final_weights(resumed)
    for name in ref_weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_two_rank_zero3_checkpoint_resumes_on_one_rank(training_runs, tmp_path):
    """Through DeepSpeed's universal checkpoint, converted on the fly; same global batch."""
    run_set = training_runs.get(3, world_size=2)
    run_dir = tmp_path / "run"
    shutil.copytree(run_set.cut_copy, run_dir)
    assert runs.run_here(run_dir, 3)["status"] == "completed"
    assert_close(run_set.reference, run_dir, from_world_size=2)


@pytest.mark.slow
def test_one_rank_zero1_checkpoint_resumes_on_two_ranks(training_runs, tmp_path):
    run_set = training_runs.get(1)
    run_dir = tmp_path / "run"
    shutil.copytree(run_set.cut_copy, run_dir)
    result = runs.train(run_dir, 1, world_size=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close(run_set.reference, run_dir, from_world_size=1)


def newest_checkpoint(run_dir):
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def replace_unnoticed(path):
    """A valid torch file with the wrong content, and a manifest that agrees with it: the
    damage only shows when DeepSpeed reads the file."""
    import json

    from checkpoint.manager import MANIFEST_FILE, file_crc32

    torch.save({"not": "a deepspeed checkpoint"}, path)
    manifest_path = path.parent / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest[path.name] = {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
    manifest_path.write_text(json.dumps(manifest))


def killed_copy(reference: Path, tmp_path: Path) -> Path:
    """A copy of the finished `reference` as if killed after its last save, before its summary
    said `completed` (a finished run is not loaded again at all: nothing to do)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, file, message",
    [
        (truncate, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "truncated"),
        (flip_bytes, "mp_rank_00_model_states.pt", "CRC32"),
        (replace_unnoticed, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "did not load"),
    ],
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    training_runs, tmp_path, damage, file, message
):
    """A warning names the damage, the previous checkpoint loads, and the rerun steps are the
    reference's bit for bit."""
    run_set = training_runs.get(1)
    run_dir = killed_copy(run_set.reference, tmp_path)
    newest = newest_checkpoint(run_dir)  # step 8, the end; step 6 before it
    damage(newest / file)
    with pytest.warns(UserWarning, match=message):
        runs.run_here(run_dir, 1)
    resume = runs.events(run_dir, "resume")[-1]
    assert resume["step"] == runs.MAX_STEPS - runs.INTERVAL
    assert_bitwise(run_set.reference, run_dir)
    # the damaged checkpoint is named in the event and kept aside, though its step was saved again
    aside = newest.with_name(f"damaged_{newest.name}")
    assert [(s["path"], message in s["error"]) for s in resume["skipped"]] == [(str(aside), True)]
    assert message in (aside / "DAMAGED").read_text() and newest.is_dir()


@pytest.mark.slow
def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(training_runs, tmp_path):
    run_set = training_runs.get(0)
    run_dir = killed_copy(run_set.reference, tmp_path)
    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        truncate(checkpoint / "mp_rank_00_model_states.pt")
    from checkpoint.manager import CheckpointError

    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as err:
        runs.run_here(run_dir, 0)
    assert "\n" not in str(err.value)
    assert "could be loaded" in str(err.value) and "checkpoint.resume=never" in str(err.value)


@pytest.mark.slow
def test_changed_run_defining_key_is_refused_by_train_py(training_runs):
    """Exit status 2 and one line naming the key; nothing in the run directory changes."""
    run_dir = training_runs.get(1).reference
    before = (run_dir / "config.yaml").read_text()
    result = runs.train(run_dir, 1, **{"optim.weight_decay": 0.3})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "optim.weight_decay (0.1 -> 0.3)" in errors[0]
    assert "checkpoint.force_resume=true" in errors[0]
    assert (run_dir / "config.yaml").read_text() == before


@pytest.mark.slow
def test_harmless_changes_resume_and_forced_changes_take_effect(training_runs, tmp_path):
    """More steps and other log/eval intervals just continue; a forced weight decay is the new
    one (the checkpoint brings the optimizer state, not its hyperparameters)."""
    run_set = training_runs.get(1)
    run_dir = tmp_path / "run"
    shutil.copytree(run_set.reference, run_dir)
    extra = {"train.max_steps": 10, "train.log_interval": 2, "train.eval_interval": 5}
    assert runs.run_here(run_dir, 1, **extra)["steps"] == 10
    assert runs.events(run_dir, "resume")[-1]["step"] == runs.MAX_STEPS

    forced = tmp_path / "forced"
    shutil.copytree(run_set.reference, forced)
    from checkpoint.manager import CheckpointError

    with pytest.raises(CheckpointError, match="optim.weight_decay"):
        runs.run_here(forced, 1, **{"optim.weight_decay": 0.0, "train.max_steps": 10})
    runs.run_here(
        forced,
        1,
        **{"optim.weight_decay": 0.0, "train.max_steps": 10, "checkpoint.force_resume": True},
    )
    # weight decay 0 from step 8 on: a different run from there, identical before
    assert runs.losses(forced)[8] == runs.losses(run_dir)[8]
    assert runs.losses(forced)[10] != runs.losses(run_dir)[10]


def test_a_resume_path_that_is_not_a_checkpoint_is_a_one_line_error(dist_env, tmp_path, capsys):
    from train import main

    argv = runs.overrides(tmp_path / "run", 1) + [f"checkpoint.resume={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: checkpoint {tmp_path} has no readable harness.json: " + (
        f"[Errno 2] No such file or directory: '{tmp_path / 'harness.json'}'\n"
    )


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_another_runs_weights(training_runs, tmp_path):
    """Weights and optimizer state from the checkpoint, step 0, and the data where the source
    stopped (same data, batch and seed); a rerun of the new run then resumes its own."""
    from checkpoint.export import consolidated_state_dict, find_checkpoint
    from checkpoint.manager import CheckpointError

    source = find_checkpoint(training_runs.get(1).reference, 6)
    run_dir = tmp_path / "finetune"
    extra = {
        "checkpoint.init_from": source,
        "train.max_steps": 2,
        "optim.lr": 1e-4,
        "optim.min_lr": 1e-5,
    }
    with pytest.raises(CheckpointError, match=r"another model: model.n_embd \(16 -> 32\)"):
        runs.run_here(run_dir, 1, **extra, **{"model.n_embd": 32})
    assert runs.run_here(run_dir, 1, **extra)["steps"] == 2
    (started,) = runs.events(run_dir, "init_from")
    assert (started["path"], started["from_step"], started["data_position"]) == (str(source), 6, 6)
    start = consolidated_state_dict(find_checkpoint(run_dir, 0))
    assert all(torch.equal(start[k], v) for k, v in consolidated_state_dict(source).items())
    assert sorted(runs.losses(run_dir)) == [1, 2]
    assert runs.run_here(run_dir, 1, **{**extra, "train.max_steps": 3})["steps"] == 3
    assert len(runs.events(run_dir, "init_from")) == 1
    assert runs.events(run_dir, "resume")[-1]["step"] == 2


@pytest.mark.slow
def test_init_from_a_one_rank_zero0_checkpoint_on_two_zero2_ranks(tmp_path):
    """ZeRO 0 keeps the optimizer state whole and ZeRO 2 in rank partitions, and neither reads
    the other's (nor does DeepSpeed's universal form start from ZeRO 0): a 2-rank ZeRO-2
    adam_spd fine-tune of a 1-rank ZeRO-0 run takes its weights with a fresh optimizer, and
    says so in one line and in the `init_from` event."""
    from checkpoint.export import consolidated_state_dict, find_checkpoint

    source_run = tmp_path / "source"
    result = runs.train(source_run, 0, **{"train.max_steps": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    source = find_checkpoint(source_run, 2)
    run_dir = tmp_path / "finetune"
    extra = {
        "checkpoint.init_from": source,
        "train.max_steps": 2,
        "optim.name": "adam_spd",
        "optim.weight_decay": 0.5,
    }
    result = runs.train(run_dir, 2, world_size=2, **extra)
    assert result.returncode == 0, result.stderr[-3000:]
    said = [line for line in result.stdout.splitlines() if "checkpoint.init_from" in line]
    assert said == [
        f"checkpoint.init_from: {source} was saved on ZeRO 0, whose optimizer state ZeRO 2 "
        "cannot read: its weights only, with a fresh optimizer"
    ]
    (started,) = runs.events(run_dir, "init_from")
    assert (started["from_step"], started["optimizer_state"]) == (2, "fresh")
    start = consolidated_state_dict(find_checkpoint(run_dir, 0))
    assert all(torch.equal(start[k], v) for k, v in consolidated_state_dict(source).items())
    assert sorted(runs.losses(run_dir)) == [1, 2]

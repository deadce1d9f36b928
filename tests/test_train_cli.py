"""`python train.py` as a user runs it: one-line errors with exit status 2, and a complete run
directory from a tiny config. Also: docs/config.md's config-key list is the schema's."""

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from checkpoint.export import consolidated_state_dict
from configs.readme import END, START, key_list, render, table_block
from tests.helpers import ROOT, cli_env, finished_run_args, run_cli, tiny_overrides, tree_hash

STEPS = 10


def train(*args: object) -> subprocess.CompletedProcess:
    return run_cli("train.py", *args)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_key_is_a_one_line_error():
    line = one_line_error(train("optim.lrr=1"))
    assert line.startswith("error: unknown config key 'optim.lrr'")


def test_bad_choice_names_the_allowed_values():
    line = one_line_error(train("optim.name=sgd"))
    assert "'optim.name'" in line and "'sgd'" in line
    assert "adamw" in line and "adam_l2" in line


def test_missing_config_file(tmp_path):
    line = one_line_error(train(tmp_path / "nope.yaml"))
    assert "nope.yaml" in line and "does not exist" in line


def test_config_file_with_a_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: [10\n  log_interval: 1\n")
    line = one_line_error(train(path))
    assert "broken.yaml" in line and "not valid YAML" in line


@pytest.mark.slow
def test_tiny_run_writes_the_run_directory(tmp_path):
    """A config file plus overrides: the record of docs/run_directory.md, contents checked."""
    config = {}
    for text in tiny_overrides(**{"model.vocab_size": 50304}):
        key, value = text.split("=", 1)
        section, name = key.split(".")
        config.setdefault(section, {})[name] = yaml.safe_load(value)
    config["train"].update(max_steps=STEPS, log_interval=1, eval_interval=5)
    config["checkpoint"] = {"interval": 5}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    proc = train(path, f"run.out_dir={tmp_path / 'runs'}", "run.name=tiny")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["model"]["n_embd"] == 32 and resolved["train"]["max_steps"] == STEPS
    # no zero_stage in the file or the overrides: one rank runs ZeRO 0, and says why
    assert "ZeRO 0 (chosen for one rank; set zero_stage to choose)" in proc.stdout
    assert resolved["zero_stage"] == 0
    meta = resolved["meta"]
    assert set(meta) >= {"torch", "deepspeed", "git_commit", "world_size"}
    assert meta["world_size"] == 1 and meta["torch"].startswith("2.")
    assert meta["kernel_path"]["path"].startswith("aten:")  # postmortem.kernel_path
    assert meta["data"]["loss_floor"] is None  # the built-in corpus has no known floor

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, STEPS + 1))
    required = {"step", "tokens", "loss", "lr", "grad_norm", "param_norm", "param_norm/decay"}
    required |= {"param_norm/no_decay", "tok_per_s", "mfu", "time"}
    for m in train_lines:
        assert required <= set(m), required - set(m)
        assert m["tokens"] == m["step"] * 4 * 16
        assert m["mfu"] is None  # no peak FLOPs on the CPU
        assert m["param_norm"] == pytest.approx(
            (m["param_norm/decay"] ** 2 + m["param_norm/no_decay"] ** 2) ** 0.5
        )
    val = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in val] == [5, 10]

    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [5, 10]
    assert all({"step", "kind", "time"} <= set(e) for e in events)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == STEPS
    assert summary["final_loss"] == train_lines[-1]["loss"]
    assert summary["final_val_loss"] == val[-1]["val_loss"]
    assert summary["divergences"] == 0
    assert summary["first_divergence_step"] is None

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    assert (checkpoints / "step_00000010" / "harness.json").is_file()


def test_readme_key_table_is_current():
    """Regenerate with `python -m configs.readme` when this fails."""
    config_doc = (ROOT / "docs" / "config.md").read_text()
    assert table_block(config_doc) == key_list()


def test_readme_script_rewrites_only_the_block():
    stale = f"intro\n{START}\n| key | default | meaning |\n| `old` | 1 | gone |\n{END}\noutro\n"
    fresh = render(stale)
    assert fresh == f"intro\n{START}\n{key_list()}\n{END}\noutro\n"
    assert render(fresh) == fresh
    with pytest.raises(ValueError, match="config-keys"):
        render("no markers here")


# --- a run's end, reruns, fresh starts (tests share one finished 5-step run) ---------------


def test_the_final_weights_are_saved_and_export_names_their_step(finished_run):
    """max_steps=5 is no multiple of checkpoint.interval=2: the end of the run saves step 5."""
    ckpts = finished_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000005"
    events = [json.loads(line) for line in (finished_run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [2, 4, 5]
    with tempfile.TemporaryDirectory() as out:
        proc = run_cli("-m", "checkpoint.export", finished_run, "--to", "torch", "--out", out)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"exported step 5 ({ckpts / 'step_00000005'}) to {out}" in proc.stdout
        exported = torch.load(Path(out) / "model.pt", weights_only=True)
    trained = consolidated_state_dict(ckpts / "step_00000005")
    before = consolidated_state_dict(ckpts / "step_00000004")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert not all(torch.equal(before[k], trained[k]) for k in trained)


def test_a_finished_run_rerun_is_complete_and_unchanged(finished_run, tmp_path):
    """The same command says the run is complete and writes nothing; a rerun that fails at
    start-up (here: a data_dir that is a file) leaves the completed summary as it was."""
    before = tree_hash(finished_run)
    proc = run_cli(*finished_run_args(finished_run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{finished_run} is complete (5 steps): nothing to do" in proc.stdout
    assert tree_hash(finished_run) == before

    copy = tmp_path / "tiny"
    shutil.copytree(finished_run, copy)
    summary = (copy / "summary.json").read_bytes()
    (tmp_path / "x").write_text("")
    proc = run_cli(
        *finished_run_args(copy, **{"train.max_steps": 7, "data.data_dir": tmp_path / "x"})
    )
    assert proc.returncode != 0
    assert (copy / "summary.json").read_bytes() == summary
    assert json.loads(summary)["final_loss"] is not None


def test_resume_never_over_a_run_is_refused_or_moves_it_aside(finished_run, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(finished_run, copy)
    before = tree_hash(copy)
    line = one_line_error(run_cli(*finished_run_args(copy, **{"checkpoint.resume": "never"})))
    assert f"{copy} already holds a run" in line and "run.move_aside=true" in line
    assert tree_hash(copy) == before

    fresh = {"checkpoint.resume": "never", "run.move_aside": "true", "train.max_steps": 2}
    proc = run_cli(*finished_run_args(copy, **fresh))
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = tmp_path / "tiny.old-1"
    assert tree_hash(aside) == {k.replace(str(copy), str(aside)): v for k, v in before.items()}
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert sorted(p.name for p in (copy / "checkpoints").glob("step_*")) == [
        "step_00000000",
        "step_00000002",
    ]


def test_run_name_must_stay_inside_out_dir(tmp_path):
    for name in ("../escape", "a/../../b"):  # more in tests/test_cli_errors.py
        line = one_line_error(train(f"run.out_dir={tmp_path / 'runs'}", f"run.name={name}"))
        assert f"run.name '{name}' must be a plain relative path inside run.out_dir" in line
    assert list(tmp_path.iterdir()) == []


def test_non_finite_hyperparameters_are_refused(tmp_path):
    line = one_line_error(train(f"run.out_dir={tmp_path}", "optim.lr=inf"))
    assert "'optim.lr'" in line and "finite number" in line
    line = one_line_error(train(f"run.out_dir={tmp_path}", "divergence.spike_sigma=.nan"))
    assert "'divergence.spike_sigma'" in line
    assert list(tmp_path.iterdir()) == []


def test_help_and_a_section_given_a_value(tmp_path):
    proc = train("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "usage: python train.py [CONFIG.yaml]" in proc.stdout and "`optim.lr`" in proc.stdout
    (tmp_path / "five.yaml").write_text("train: 5\n")
    line = one_line_error(train(tmp_path / "five.yaml"))
    expected = "'train' is a section of keys (such as train.max_steps), not a value: got 5"
    assert line == f"error: {expected}"


def test_ctrl_c_saves_and_stops(tmp_path):
    """SIGINT is handled like SIGTERM: a checkpoint at the next step, status `stopped`, exit 130;
    the same command then resumes from that checkpoint."""
    run_dir = tmp_path / "cc"
    args = finished_run_args(run_dir, **{"train.max_steps": 300, "checkpoint.interval": 100})
    proc = subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=ROOT, env=cli_env(), stderr=subprocess.PIPE
    )
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr.decode()[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and 2 <= summary["steps"] < 300
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["signal"] for e in events if e["kind"] == "preempt"] == ["SIGINT"]
    tag = f"step_{summary['steps']:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag


def test_a_failing_run_closes_its_record_with_the_error(tmp_path):
    """An exception once the run record is open: summary `failed`, with the error in it."""
    from data.config import DataConfig
    from data.loader import resolve_dataset

    run_dir, stale = tmp_path / "broken", tmp_path / "stale"
    builtin = DataConfig(dataset="builtin-compact", data_dir=str(ROOT / "data" / "cache"))
    shutil.copytree(resolve_dataset(builtin), stale)
    with open(stale / "train.bin", "r+b") as f:  # found when the loader opens it: record open
        f.truncate(100_000)
    proc = run_cli(*finished_run_args(run_dir, **{"data.dataset": stale}))
    assert proc.returncode == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 0
    assert "train.bin" in summary["error"] and "Traceback" not in proc.stderr


def test_training_on_prepared_data_imports_neither_pyarrow_nor_datasets(finished_run, tmp_path):
    """pyarrow (a 55 MB wheel) and `datasets` are for preparing data (data/text.py): an image or
    a job that trains from prepared .bin files must not need them. The finished run's fixture
    has prepared the compact corpus; this run trains on it in one process, then looks."""
    script = (
        "import runpy, sys\n"
        "main = runpy.run_path('train.py')['main']\n"
        "rc = main(sys.argv[1:])\n"
        "print('heavy:', [m for m in ('pyarrow', 'datasets') if m in sys.modules])\n"
        "sys.exit(rc)\n"
    )
    args = finished_run_args(tmp_path / "light", **{"train.max_steps": 2})[1:]
    proc = run_cli("-c", script, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "heavy: []"

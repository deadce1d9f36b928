"""`python train.py` as a user runs it: one-line errors with exit status 2, and a complete run
directory from a tiny config. Also: the README's config-key table is the schema's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import key_table
from configs.readme import END, START, render, table_block
from tests.helpers import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
# A process group set up earlier in this pytest process (the `dist_env` fixture) leaves its
# rendezvous in os.environ; a child must make its own.
RENDEZVOUS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
ENV = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
ENV.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
STEPS = 10


def train(*args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


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
    """A config file plus overrides: the record DESIGN.md promises, with the right contents."""
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
    meta = resolved["meta"]
    assert set(meta) >= {"torch", "deepspeed", "git_commit", "world_size"}
    assert meta["world_size"] == 1 and meta["torch"].startswith("2.")
    assert meta["kernel_path"]["path"].startswith("aten:")  # monitor.kernel_path
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
    readme = (ROOT / "README.md").read_text()
    assert table_block(readme) == key_table()


def test_readme_script_rewrites_only_the_block():
    stale = f"intro\n{START}\n| key | default | meaning |\n| `old` | 1 | gone |\n{END}\noutro\n"
    fresh = render(stale)
    assert fresh == f"intro\n{START}\n{key_table()}\n{END}\noutro\n"
    assert render(fresh) == fresh
    with pytest.raises(ValueError, match="config-keys"):
        render("no markers here")

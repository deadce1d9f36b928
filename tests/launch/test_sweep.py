"""`python -m launch.sweep`: expansion, names, validation before submission, the manifest, the
dry run of every shipped sweep, skipping finished runs, and one real CPU sweep run twice."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from checkpoint.layout import HARNESS_FILE, tag_for
from configs import load_config, parse_override, validate
from launch import sweep as sw

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "configs" / "default.yaml"
SHIPPED = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
SHIPPED += sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
# runs per shipped sweep: the paper's designs and their CPU versions keep their structure
EXPECTED_RUNS = {
    "adamw_wd": 3,
    "finetune_small_lr": 3,
    "adam_l2": 7,
    "bf16_divergence": 9,
    "cpu_adamw_wd": 3,
    "cpu_finetune_small_lr": 3,
    "cpu_adam_l2": 3,
    "cpu_bf16_divergence": 9,
    "proxy_wd_norm": 9,
    "proxy_adam_l2": 6,
    "proxy_lr_clip": 8,
    "proxy_bf16_divergence": 9,
    "proxy_controls": 8,
    "stream_wd": 9,
    "stream_bf16_lr": 2,
    "stream_bf16": 9,
    "stream_kernel_path": 2,
    "stream_adam_l2": 12,
    "cpu_decay_forms_base": 1,
    "cpu_decay_forms": 10,
    "flash_pilot": 18,
    "flash_pilot_lr3e2": 4,
    "heal_cases": 4,
}
PROXY_BUDGET_MIN = 60
# a tiny GPT on the built-in corpus: a run is mostly interpreter and DeepSpeed start-up
TINY_RUN = {
    "run.device": "cpu",
    "model.n_layer": 2,
    "model.n_head": 2,
    "model.n_embd": 32,
    "model.block_size": 16,
    "data.data_dir": str(ROOT / "data" / "cache"),
    "data.eval_sequences": 4,
    "train.max_steps": 20,
    "train.micro_batch_size": 4,
    "train.eval_interval": 0,
    "checkpoint.interval": 0,
    "telemetry.enabled": False,
    "wandb.mode": "disabled",
}


def write_sweep(tmp_path: Path, name: str = "s", **sections) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump({"name": name, "base": str(DEFAULT), **sections}, sort_keys=False)
    )
    return path


def no_tty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


# ------------------------------------------------------------------------------------------
# Expansion and names


def test_grid_is_a_cartesian_product_named_by_the_keys_that_vary(tmp_path):
    path = write_sweep(
        tmp_path,
        overrides={"train.max_steps": 20},
        grid={
            "optim.weight_decay": [0.0, 0.1],
            "precision": ["bf16", "fp32"],
            "optim.lr": ["1e-3", 3.0e-3],  # YAML 1.1 reads 1e-3 as text; the sweep means 0.001
            "run.seed": [1, 2],
            "optim.betas": [[0.9, 0.95]],  # one value: applied, not in the name
        },
    )
    runs = sw.expand(sw.load_sweep(path), str(tmp_path / "out"))
    assert len(runs) == 16
    names = [r.name for r in runs]
    assert len(set(names)) == 16
    assert names[0] == "wd0-bf16-lr1e-3-s1" and "wd0.1-fp32-lr3e-3-s2" in names
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in names)
    run = runs[names.index("wd0.1-fp32-lr3e-3-s2")]
    cfg = run.config
    assert (cfg.optim.weight_decay, cfg.precision, cfg.optim.lr, cfg.run.seed) == (
        0.1,
        "fp32",
        3e-3,
        2,
    )
    assert cfg.optim.betas == (0.9, 0.95) and cfg.train.max_steps == 20
    assert cfg.run.name == run.name and cfg.wandb.group == "s"
    assert run.run_dir == tmp_path / "out" / "s" / run.name
    assert [r.name for r in sw.expand(sw.load_sweep(path), str(tmp_path / "out"))] == names


def test_zip_varies_keys_together_and_names_by_the_fewest_that_tell_rows_apart(tmp_path):
    path = write_sweep(
        tmp_path,
        zip={"optim.lr": [1e-3, 3e-3, 1e-2], "optim.min_lr": [1e-4, 3e-4, 1e-3]},
        grid={"run.seed": [1, 2]},
    )
    runs = sw.expand(sw.load_sweep(path), str(tmp_path))
    assert [r.name for r in runs] == [
        f"lr{lr}-s{s}" for lr in ("1e-3", "3e-3", "0.01") for s in (1, 2)
    ]
    assert {(r.config.optim.lr, r.config.optim.min_lr) for r in runs} == {
        (1e-3, 1e-4),
        (3e-3, 3e-4),
        (1e-2, 1e-3),
    }
    # the first key repeats a value, so the second joins the name
    path = write_sweep(
        tmp_path, zip={"precision": ["bf16", "fp32", "bf16"], "optim.weight_decay": [0, 0, 0.1]}
    )
    assert [r.name for r in sw.expand(sw.load_sweep(path), str(tmp_path))] == [
        "bf16-wd0",
        "fp32-wd0",
        "bf16-wd0.1",
    ]


@pytest.mark.parametrize(
    ("key", "value", "part"),
    [
        ("optim.weight_decay", 0.1, "wd0.1"),
        ("optim.weight_decay", 0.0, "wd0"),
        ("optim.lr", 6e-4, "lr6e-4"),
        ("optim.lr", 2.5e-5, "lr2.5e-5"),
        ("optim.lr", 0.03, "lr0.03"),
        ("optim.grad_clip", 1.0, "clip1"),
        ("model.z_loss", 1e-4, "zl1e-4"),
        ("model.qk_layernorm", True, "qkln"),
        ("model.qk_layernorm", False, "noqkln"),
        ("optim.name", "adam_l2", "adam_l2"),
        ("run.seed", 3, "s3"),
        ("divergence.window", 64, "window64"),
        ("checkpoint.init_from", "runs/a b/step_1", "init_fromruns_a_b_step_1"),
    ],
)
def test_name_parts(key, value, part):
    assert sw.name_part(key, value) == part


@pytest.mark.parametrize(
    "value", [6e-4, 1e-8, 0.1, 3, True, "bf16", "runs/x/step_00000060", [0.9, 0.95], "null"]
)
def test_override_text_reads_back_to_the_value(value):
    _, parsed = parse_override(sw.override_text("optim.lr", value))
    assert parsed == value


def test_extends_merges_sections_and_null_deletes(tmp_path):
    parent = write_sweep(
        tmp_path,
        "parent",
        overrides={"train.max_steps": 50, "optim.lr": 1e-3},
        grid={"optim.weight_decay": [0, 0.1], "run.seed": [1, 2, 3]},
        slurm={"nodes": 2},
        tokens_per_second=1000,
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        yaml.safe_dump(
            {
                "extends": parent.name,
                "name": "child",
                "overrides": {"train.max_steps": 10},
                "grid": {"run.seed": None, "precision": ["bf16", "fp32"]},
                "slurm": None,
                "tokens_per_second": None,
            }
        )
    )
    sweep = sw.load_sweep(child)
    assert sweep.name == "child" and sweep.base == DEFAULT
    assert sweep.overrides == {"train.max_steps": 10, "optim.lr": 1e-3}
    assert [a.keys for a in sweep.axes] == [("optim.weight_decay",), ("precision",)]
    assert sweep.slurm == {} and sweep.tokens_per_second is None


# ------------------------------------------------------------------------------------------
# Validation before anything is submitted


def test_unknown_key_is_one_line_and_submits_nothing(tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path, grid={"optim.weight_decay": [0, 0.1], "optim.lrr": [1e-3]})
    out = tmp_path / "out"
    code = sw.main([str(path), "--executor", "serial", "--yes", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unknown config key 'optim.lrr'" in err[0] and "optim.lr" in err[0]
    assert not out.exists()


def test_bad_value_in_one_run_names_the_run_and_key_and_submits_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, zip={"optim.lr": [1e-3, 1e-3], "optim.min_lr": [1e-4, 1e-2]})
    out = tmp_path / "out"
    code = sw.main([str(path), "--executor", "serial", "--yes", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "run 'minlr0.01'" in err[0] and "optim.min_lr" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"grid": {"run.name": ["a", "b"]}}, "'run.name' is set by the sweep"),
        ({"zip": {"optim.lr": [1e-3], "optim.min_lr": [1e-4, 1e-5]}}, "equal lengths"),
        ({"grid": {"optim.lr": []}}, "non-empty list"),
        ({"gird": {"optim.lr": [1e-3]}}, "unknown sweep key 'gird'"),
        ({"grid": {"optim.lr": [1e-3, 1e-3]}}, "the same value(s) twice"),
        ({"grid": {"optim.lr": [0.1, 0.1000001]}}, "both named 'lr0.1'"),
    ],
)
def test_malformed_sweeps_are_one_line_errors(tmp_path, capsys, sections, message):
    path = write_sweep(tmp_path, **sections)
    assert sw.main([str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_without_a_terminal_only_yes_submits(tmp_path, capsys, monkeypatch):
    no_tty(monkeypatch)
    path = write_sweep(tmp_path, overrides={"train.max_steps": 5})
    out = tmp_path / "out"
    assert sw.main([str(path), "--executor", "serial", "--out", str(out)]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert not out.exists()


def test_launcher_flags_reach_launch_options(tmp_path):
    path = write_sweep(
        tmp_path, slurm={"nodes": 2, "gpus_per_node": 8, "time": "1-00:00:00", "partition": "a"}
    )
    sweep = sw.load_sweep(path)
    options, wait = sw.launch_options("slurm", sweep, ["--partition", "b", "--wait"])
    assert (options.nodes, options.gpus_per_node, options.time_min) == (2, 8, 1440)
    assert options.partition == "b" and wait  # the command line beats the sweep file
    local, _ = sw.launch_options("local", sweep, [])
    assert local.nodes == 1 and local.partition is None  # slurm: defaults are SLURM's only


# ------------------------------------------------------------------------------------------
# Manifest, cost, dry run of every shipped sweep


def test_manifest_lists_every_run_with_overrides_that_rebuild_its_config(tmp_path):
    path = write_sweep(tmp_path, grid={"optim.weight_decay": [0, 0.1], "precision": ["bf16"]})
    sweep = sw.load_sweep(path)
    runs = sw.expand(sweep, str(tmp_path / "out"))
    manifest = yaml.safe_load(
        sw.write_manifest(sweep, runs, str(tmp_path / "out"), "serial").read_text()
    )
    assert manifest["sweep"] == "s" and manifest["executor"] == "serial"
    assert [r["name"] for r in manifest["runs"]] == ["wd0", "wd0.1"]
    for entry, run in zip(manifest["runs"], runs, strict=True):
        assert entry["values"]["optim.weight_decay"] == run.config.optim.weight_decay
        assert entry["run_dir"] == str(run.run_dir) and entry["state"] == "new"
        assert load_config(DEFAULT, entry["overrides"]) == run.config
        assert entry["command"].startswith("python train.py ")


def test_gpu_cost_is_steps_times_tokens_times_flops_over_throughput(tmp_path):
    path = write_sweep(
        tmp_path,
        overrides={"train.max_steps": 1000, "train.eval_interval": 0, "data.eval_sequences": 32},
        grid={"optim.weight_decay": [0, 0.1]},
        tokens_per_second=1000,
    )
    sweep = sw.load_sweep(path)
    runs = sw.expand(sweep, str(tmp_path))
    cost = sw.estimate(runs, sweep, ranks=2)
    tokens_per_step = 16 * 128 * 2  # default.yaml: micro 16 x ctx 128, x 2 ranks
    train_s = 1000 * tokens_per_step / 1000
    eval_s = 32 * 128 / 1000 / 3  # one forward-only evaluation of 32 sequences, at the end
    assert cost.gpu and cost.seconds["wd0"] == pytest.approx(train_s + eval_s)
    assert "GPU-hours" in cost.line(runs, 2)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_dry_run_prints_every_run_config_and_the_cost(path, tmp_path, capsys):
    out = tmp_path / "out"
    assert sw.main([str(path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    sweep = sw.load_sweep(path)
    runs = sw.expand(sweep, str(out))
    assert len(runs) == EXPECTED_RUNS[path.stem]
    blocks = re.split(r"^--- run \d+/\d+: .*---$", text, flags=re.M)[1:]
    assert len(blocks) == len(runs)
    for block, run in zip(blocks, runs, strict=True):
        printed = yaml.safe_load(block.split("\ncost:")[0])
        assert validate(printed) == run.config  # the printed YAML is the resolved config
        assert f"  {run.name} " in text
    cost = [line for line in text.splitlines() if line.startswith("cost: ")]
    assert len(cost) == 1 and f"{len(runs)} of {len(runs)} runs to do" in cost[0]
    if sweep.tokens_per_second:
        assert "GPU-hours" in cost[0]
    else:
        minutes = float(re.search(r"about ([\d,.]+) minutes", cost[0]).group(1).replace(",", ""))
        assert "at most about" in cost[0] and "a bound" in cost[0]  # fitted to small models
        if path.stem.startswith("stream_"):
            assert minutes / len(runs) <= 15  # launch.sizing: a run within 15 min on one core
        elif path.stem.startswith("proxy_"):
            assert minutes <= PROXY_BUDGET_MIN
        elif path.stem.startswith("flash_"):
            # issue 20's pilot: about 15 minutes a run measured (the bound is 2-3x that)
            assert minutes / len(runs) <= 45
        else:
            assert minutes <= 25  # the CPU versions of the paper's experiments


# ------------------------------------------------------------------------------------------
# Finished runs are skipped, unfinished ones resumed


def fake_run(run_dir: Path, status: str, steps: int, saved: int | None = None) -> None:
    """A run's summary at `steps` and its checkpoint at `saved` (default: `steps`)."""
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": status, "steps": steps}))
    checkpoint = run_dir / "checkpoints" / tag_for(steps if saved is None else saved)
    checkpoint.mkdir(parents=True)
    (checkpoint / HARNESS_FILE).write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text(checkpoint.name)


def test_finished_runs_are_skipped_and_unfinished_resumed(tmp_path, capsys, monkeypatch):
    path = write_sweep(
        tmp_path, overrides={"train.max_steps": 20}, grid={"optim.weight_decay": [0, 0.1, 0.3]}
    )
    out = tmp_path / "out"
    fake_run(out / "s" / "wd0", "completed", 20)
    fake_run(out / "s" / "wd0.1", "completed", 10)  # max_steps grew since: resume
    (out / "s" / "wd0.3" / "checkpoints").mkdir(parents=True)  # killed before any summary
    (out / "s" / "wd0.3" / "checkpoints" / "latest").write_text("step_00000005")  # not saved
    states = {r.name: (r.state, r.steps_done) for r in sw.expand(sw.load_sweep(path), str(out))}
    assert states == {"wd0": ("done", 20), "wd0.1": ("resume", 10), "wd0.3": ("new", 0)}
    assert sw.main([str(path), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  wd0 +skip \(finished\)", text, flags=re.M)
    assert re.search(r"^  wd0.1 +resume at 10", text, flags=re.M)
    assert "2 of 3 runs to do" in text
    # issue 22: stopped at step 15 with its newest checkpoint at 10: the plan says 10
    fake_run(out / "s" / "wd1", "stopped", 15, saved=10)
    assert sw.run_state(out / "s" / "wd1", 20) == ("resume", 10)

    for name in ("wd0.1", "wd0.3"):
        (out / "s" / name / "summary.json").write_text('{"status": "diverged", "steps": 7}')
    no_tty(monkeypatch)  # nothing to submit: no confirmation needed
    assert sw.main([str(path), "--executor", "serial", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not (out / "s" / sw.MANIFEST).exists()


# ------------------------------------------------------------------------------------------
# A real sweep on the CPU


@pytest.mark.slow
def test_serial_sweep_trains_every_run_then_skips_them_all(tmp_path, capsys, cpu_train_env):
    """2 weight decays x 2 precisions, 20 steps of a tiny GPT on the built-in corpus, each in its
    own `python train.py`; a second invocation finds them all completed."""
    path = write_sweep(
        tmp_path,
        "real",
        overrides=TINY_RUN,
        grid={"optim.weight_decay": [0.0, 0.1], "precision": ["bf16", "fp32"]},
    )
    out = tmp_path / "out"
    args = [str(path), "--executor", "serial", "--yes", "--out", str(out)]
    assert sw.main(args) == 0, capsys.readouterr().out
    names = ["wd0-bf16", "wd0-fp32", "wd0.1-bf16", "wd0.1-fp32"]
    for name in names:
        run_dir = out / "real" / name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 20, name
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["wandb"]["group"] == "real" and config["run"]["name"] == name
        assert (run_dir / "train.log").is_file()
    manifest = yaml.safe_load((out / "real" / sw.MANIFEST).read_text())
    assert [r["name"] for r in manifest["runs"]] == names
    first = capsys.readouterr().out
    assert first.count("completed at step 20") == 4

    assert sw.main(args) == 0
    second = capsys.readouterr().out
    assert second.count("skip (finished)") == 4 and "nothing to do" in second


@pytest.mark.slurm
def test_slurm_sweep_submits_one_job_array(tmp_path, capsys, slurm_cluster):
    """Through a real one-node SLURM cluster: both runs are queued as one job array, then
    --wait collects them."""
    path = write_sweep(
        tmp_path, "queued", overrides=TINY_RUN, grid={"optim.weight_decay": [0, 0.1]}
    )
    out = tmp_path / "out"
    argv = [str(path), "--executor", "slurm", "--yes", "--out", str(out), "--wait"]
    argv += [f"--partition={slurm_cluster.partition}", "--time=10"]
    assert sw.main(argv) == 0, capsys.readouterr().out
    text = capsys.readouterr().out
    jobs = re.findall(r"job (\d+_\d+) \(array (\d+)\)", text)
    assert [job for job, _ in jobs] == [f"{jobs[0][1]}_0", f"{jobs[0][1]}_1"], text
    for name in ("wd0", "wd0.1"):
        summary = json.loads((out / "queued" / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == TINY_RUN["train.max_steps"]


# ------------------------------------------------------------------------------------------
# Interrupts reach the run, which saves; one writer per run (issue 22)


def start_long_sweep(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m launch.sweep` (serial) on one long run, started as a user would (in the
    environment `cpu_train_env` sets), once the run has trained past step 5 (between two of its
    checkpoints)."""
    overrides = {**TINY_RUN, "train.max_steps": 2000, "checkpoint.interval": 500}
    path = write_sweep(tmp_path, "long", overrides={**overrides, "train.log_interval": 1})
    out = tmp_path / "out"
    sweep = subprocess.Popen(
        [sys.executable, "-m", "launch.sweep", str(path), "--executor", "serial", "--yes"]
        + ["--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = out / "long" / "run"  # a sweep of one run names it `run`
    deadline = time.time() + 240
    while last_step(run_dir) < 5 and sweep.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert last_step(run_dir) >= 5, "the sweep's run never reached step 5"
    return sweep, run_dir


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines[:-1]), default=0)  # whole lines


def train_pid(run_dir: Path) -> int:
    return json.loads((run_dir / "run.lock").read_text())["pid"]


def gone(pid: int, timeout_s: float = 120) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, "stopped"), (signal.SIGTERM, "preempted")]
)
def test_a_signal_to_a_sweep_saves_its_run_at_the_current_step(
    tmp_path, cpu_train_env, signum, status
):
    """Ctrl-C used to leave the run `running` at step 15 with `latest` at 10, a 35-line
    traceback, and a plan that said "resume at 15"; SIGTERM orphaned the run."""
    sweep, run_dir = start_long_sweep(tmp_path)
    child = train_pid(run_dir)
    sweep.send_signal(signum)
    out, err = sweep.communicate(timeout=240)
    assert sweep.returncode == 128 + signum, out + err
    assert "Traceback" not in err and err.strip() == ""
    assert f"interrupted ({signal.Signals(signum).name}): rerun to resume" in out.splitlines()[-1]
    assert gone(child, 5)  # the sweep waited for it
    summary = json.loads((run_dir / "summary.json").read_text())
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert summary["status"] == status and saved == f"step_{summary['steps']:08d}"
    assert 5 <= summary["steps"] < 500  # its current step, between two periodic checkpoints
    plan = subprocess.run(
        [sys.executable, "-m", "launch.sweep", str(tmp_path / "long.yaml"), "--dry-run"]
        + ["--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert re.search(rf"^  run +resume at {summary['steps']} ", plan.stdout, flags=re.M)


@pytest.mark.slow
def test_a_killed_sweep_leaves_no_run_training(tmp_path, cpu_train_env):
    """`kill -9` on the sweep: its run gets SIGTERM from the kernel, saves and stops, so a rerun
    of the sweep never meets a second writer (the run lock would refuse one anyway)."""
    sweep, run_dir = start_long_sweep(tmp_path)
    child = train_pid(run_dir)
    sweep.kill()
    sweep.communicate(timeout=60)
    assert gone(child), "the sweep's run trained on after the sweep was killed"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and 5 <= summary["steps"] < 500
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["signal"] for e in events if e["kind"] == "preempt"] == ["SIGTERM"]

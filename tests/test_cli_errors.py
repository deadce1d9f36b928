"""Every CLI entry point against a table of bad input, as a user would type it.

For each case: exit status 2, exactly one `error:` line that names the problem, no traceback,
and nothing already written changed (the finished run, a prepared dataset and the inputs
themselves hash the same before and after). Cases that fail before anything is built call the
entry point's `main` in this process (a traceback would fail the test just as well, and the
imports are paid once); cases that get as far as a training run's start run `python train.py`.
"""

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.run_lock import RunLock
from tests.helpers import cli_env, finished_run_args, run_cli, tree_hash

ERROR_LINE = re.compile(r"(^|: )error: ")  # ours (`error: ...`) and argparse's (`prog: error:`)


def _mains() -> dict[str, Callable[[list[str]], int]]:
    import checkpoint.export
    import data.prepare
    import experiments.aeos
    import launch.slurm
    import launch.sweep
    import postmortem.diagnose
    import postmortem.kernel_path
    import postmortem.replay
    import study.compare
    import study.report
    import train

    return {
        "train.py": train.main,
        "data.prepare": data.prepare.main,
        "checkpoint.export": checkpoint.export.main,
        "postmortem.replay": postmortem.replay.main,
        "postmortem.diagnose": postmortem.diagnose.main,
        "experiments.aeos": experiments.aeos.main,
        "postmortem.kernel_path": postmortem.kernel_path.main,
        "launch.slurm": launch.slurm.main,
        "launch.sweep": launch.sweep.main,
        "study.compare": study.compare.main,
        "study.report": study.report.main,
    }


# (id, entry point, arguments, what the error line must say). {run}: the finished run, {data}: a
# prepared dataset (GPT-2 ids), {in}: the inputs below, {tmp}: a fresh directory of the case.
CASES = [
    # train.py: config files and overrides
    ("train-missing-config", "train.py", ["{in}/nope.yaml"], "does not exist"),
    ("train-empty-config", "train.py", ["{in}/empty.yaml"], "is empty"),
    ("train-truncated-config", "train.py", ["{in}/truncated.yaml"], "not valid YAML"),
    ("train-latin1-config", "train.py", ["{in}/latin1.yaml"], "not UTF-8"),
    ("train-list-config", "train.py", ["{in}/list.yaml"], "must hold a mapping"),
    ("train-section-value", "train.py", ["{in}/section.yaml"], "'train' is a section"),
    ("train-wrong-type", "train.py", ["train.max_steps=abc"], "'train.max_steps'"),
    ("train-out-of-range", "train.py", ["train.max_steps=0"], "'train.max_steps'"),
    ("train-emulated-fp32", "train.py", ["bf16_kernels=emulated"], "needs precision=bf16"),
    ("train-flash-native", "train.py", ["bf16_flash=fp32_delta"], "needs bf16_kernels=emulated"),
    ("train-flash-unknown", "train.py", ["bf16_flash=fa3"], "expected 'fa2', 'fp32_delta'"),
    ("train-betas-range", "train.py", ["optim.betas=[0.9,1.5]"], "optim.betas"),
    ("train-lr-inf", "train.py", ["optim.lr=inf"], "'optim.lr': Input should be a finite"),
    ("train-wd-nan", "train.py", ["optim.weight_decay=nan"], "'optim.weight_decay'"),
    ("train-unknown-key", "train.py", ["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    ("train-name-escape", "train.py", ["run.name=../escape"], "inside run.out_dir"),
    ("train-name-absolute", "train.py", ["run.name=/tmp/x"], "inside run.out_dir"),
    ("train-move-aside-alone", "train.py", ["run.move_aside=true"], "checkpoint.resume=never"),
    # train.py: a run's start (a subprocess each)
    ("train-resume-never-over-a-run", "run", ["checkpoint.resume=never"], "already holds a run"),
    ("train-config-change", "run", ["optim.lr=0.01"], "different optim.lr"),
    ("train-run-locked", "locked", [], "is being written by PID"),  # this test holds its lock
    ("train-cuda-without-gpu", "run", ["run.device=cuda"], "no CUDA device"),
    ("train-resume-missing", "fresh", ["checkpoint.resume={tmp}/nope"], "harness.json"),
    ("train-init-from-missing", "fresh", ["checkpoint.init_from={tmp}/nope"], "harness.json"),
    ("train-dataset-missing", "fresh", ["data.dataset={tmp}/nope"], "no meta.json"),
    ("train-data-dir-file", "fresh", ["data.data_dir={in}/afile"], "is a file"),
    ("train-meta-corrupt", "fresh", ["data.dataset={in}/meta_corrupt"], "meta.json is unreadable"),
    ("train-vocab-too-small", "fresh", ["data.dataset={data}"], "set model.vocab_size=50304"),
    ("train-wandb-no-login", "fresh", ["wandb.mode=online"], "wandb login"),
    # data.prepare
    ("prepare-missing", "data.prepare", ["{in}/nope.txt", "--out", "{tmp}/o"], "unknown source"),
    ("prepare-empty-dir", "data.prepare", ["{in}/empty_dir", "--out", "{tmp}/o"], "no input"),
    ("prepare-empty-doc", "data.prepare", ["{in}/blank", "--out", "{tmp}/o"], "empty input"),
    ("prepare-truncated", "data.prepare", ["{in}/cut.jsonl", "--out", "{tmp}/o"], "not valid JSON"),
    ("prepare-latin1-txt", "data.prepare", ["{in}/latin1.txt", "--out", "{tmp}/o"], "not UTF-8"),
    ("prepare-bad-jsonl", "data.prepare", ["{in}/bad.jsonl", "--out", "{tmp}/o"], ":2: not UTF-8"),
    ("prepare-wrong-type", "data.prepare", ["{in}/number.jsonl", "--out", "{tmp}/o"], "'text'"),
    ("prepare-parquet", "data.prepare", ["{in}/bad.parquet", "--out", "{tmp}/o"], "parquet"),
    ("prepare-suffix", "data.prepare", ["{in}/afile", "--out", "{tmp}/o"], "unsupported file"),
    (
        "prepare-val-fraction",
        "data.prepare",
        ["{in}/docs", "--out", "{tmp}/o", "--val-fraction", "1.5"],
        "val_fraction must be in (0, 1)",
    ),
    (
        "prepare-val-fraction-nan",
        "data.prepare",
        ["{in}/docs", "--out", "{tmp}/o", "--val-fraction", "nan"],
        "val_fraction must be in (0, 1)",
    ),
    (
        "prepare-val-fraction-type",
        "data.prepare",
        ["{in}/docs", "--out", "{tmp}/o", "--val-fraction", "x"],
        "--val-fraction",
    ),
    (
        "prepare-num-proc",
        "data.prepare",
        ["{in}/docs", "--out", "{tmp}/o", "--num-proc", "0"],
        "num_proc must be >= 1",
    ),
    ("prepare-over-dataset", "data.prepare", ["{in}/docs", "--out", "{data}"], "pass --force"),
    (
        "prepare-force-over-input",
        "data.prepare",
        ["{in}/docs", "--out", "{in}/docs", "--force"],
        "holds the input",
    ),
    (
        "prepare-force-over-parent",
        "data.prepare",
        ["{in}/docs/a.txt", "--out", "{in}", "--force"],
        "holds the input",
    ),
    (
        "prepare-force-over-file",
        "data.prepare",
        ["{in}/docs", "--out", "{in}/afile", "--force"],
        "not a prepared dataset",
    ),
    (
        "prepare-force-over-dir",
        "data.prepare",
        ["{in}/docs", "--out", "{in}/other", "--force"],
        "not a prepared dataset",
    ),
    # checkpoint.export
    ("export-missing", "checkpoint.export", ["{tmp}/nope", "--to", "torch"], "does not exist"),
    ("export-empty", "checkpoint.export", ["{in}/other", "--to", "hf"], "no complete checkpoint"),
    ("export-step", "checkpoint.export", ["{run}", "--step", "3", "--to", "hf"], "steps: 4, 5"),
    ("export-step-type", "checkpoint.export", ["{run}", "--step", "x", "--to", "hf"], "--step"),
    ("export-to", "checkpoint.export", ["{run}", "--to", "onnx"], "--to"),
    (
        "export-out-file",
        "checkpoint.export",
        ["{run}", "--to", "torch", "--out", "{in}/afile"],
        "is an existing file",
    ),
    (
        "export-out-dir",
        "checkpoint.export",
        ["{run}", "--to", "torch", "--out", "{in}/other"],
        "holds other files",
    ),
    ("export-truncated", "checkpoint.export", ["{in}/damaged", "--to", "torch"], "consolidate"),
    # postmortem.replay
    ("replay-missing", "postmortem.replay", ["{tmp}/nope"], "no detections"),
    ("replay-no-detection", "postmortem.replay", ["{run}"], "has no detections"),
    ("replay-event-type", "postmortem.replay", ["{run}", "--event", "x"], "--event"),
    # postmortem.diagnose and experiments.aeos
    ("diagnose-missing", "postmortem.diagnose", ["{tmp}/nope"], "not a run directory"),
    ("diagnose-event-type", "postmortem.diagnose", ["{run}", "--event", "x"], "--event"),
    ("aeos-lr-type", "experiments.aeos", ["--lrs", "x", "--out", "{tmp}/a"], "--lrs"),
    ("kernel-path-missing", "postmortem.kernel_path", ["{tmp}/nope"], "does not exist"),
    ("kernel-path-batches", "postmortem.kernel_path", ["{run}", "--batches", "0"], "--batches"),
    (
        "kernel-path-ops-file",
        "postmortem.kernel_path",
        ["--ops-compare", "{in}/empty.yaml", "{in}/empty.yaml"],
        "not an --ops file",
    ),
    # data.prepare ngram
    ("ngram-tokens", "data.prepare", ["ngram", "--out", "{tmp}/o", "--tokens", "x"], "token count"),
    (
        "ngram-order",
        "data.prepare",
        ["ngram", "--out", "{tmp}/o", "--tokens", "1000", "--order", "1"],
        "order must be in [2, 5]",
    ),
    (
        "ngram-vocab",
        "data.prepare",
        ["ngram", "--out", "{tmp}/o", "--tokens", "1000", "--vocab", "1"],
        "--vocab must be in",
    ),
    # launch.slurm (all fail before anything is submitted)
    ("slurm-missing", "launch.slurm", ["{in}/nope.yaml"], "does not exist"),
    ("slurm-empty", "launch.slurm", ["{in}/empty.yaml"], "is empty"),
    ("slurm-lr-inf", "launch.slurm", ["configs/default.yaml", "optim.lr=inf"], "finite"),
    ("slurm-escape", "launch.slurm", ["configs/default.yaml", "run.name=../x"], "run.out_dir"),
    ("slurm-nodes", "launch.slurm", ["configs/default.yaml", "--nodes", "0"], "--nodes"),
    ("slurm-time", "launch.slurm", ["configs/default.yaml", "--time", "soon"], "--time"),
    # launch.sweep
    ("sweep-missing", "launch.sweep", ["{in}/nope.yaml"], "does not exist"),
    ("sweep-empty", "launch.sweep", ["{in}/empty.yaml"], "is empty"),
    ("sweep-truncated", "launch.sweep", ["{in}/sweep_cut.yaml"], "not valid YAML"),
    ("sweep-grid-type", "launch.sweep", ["{in}/sweep_grid5.yaml", "--dry-run"], "grid"),
    ("sweep-lr-inf", "launch.sweep", ["{in}/sweep_inf.yaml", "--dry-run"], "finite"),
    ("sweep-unknown-key", "launch.sweep", ["{in}/sweep_bogus.yaml"], "unknown sweep key"),
    ("sweep-name-escape", "launch.sweep", ["{in}/sweep_escape.yaml", "--dry-run"], "../x"),
    # study.compare and study.report
    ("compare-missing", "study.compare", ["{tmp}/nope"], "does not exist"),
    ("compare-not-a-run", "study.compare", ["{in}/other"], "neither a run directory"),
    ("report-missing", "study.report", ["{tmp}/nope"], "does not exist"),
    ("report-no-metrics", "study.report", ["{in}/nometrics", "--out", "{tmp}/r"], "no run in"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, finished_run: Path) -> Path:
    """The bad (and a few good) inputs the cases name."""
    root = tmp_path_factory.mktemp("inputs")
    files = {
        "empty.yaml": b"",
        "truncated.yaml": b"train:\n  max_steps: [10\n",
        "latin1.yaml": b"run:\n  name: caf\xe9\n",
        "list.yaml": b"- 1\n",
        "section.yaml": b"train: 5\n",
        "docs/a.txt": b"a document of plain words " * 40,
        "docs/b.txt": b"another document, with other words " * 40,
        "blank/empty.txt": b"",
        "cut.jsonl": b'{"text": "ab\n',
        "latin1.txt": b"caf\xe9",
        "bad.jsonl": b'{"text": "fine"}\n{"text": "\xff"}\n',
        "number.jsonl": b'{"text": 5}\n',
        "bad.parquet": b"PAR1 not really",
        "afile": b"keep me",
        "other/keep.txt": b"keep me too",
        "sweep_cut.yaml": b"grid: [\n",
        "sweep_grid5.yaml": b"name: s\nbase: configs/default.yaml\ngrid: 5\n",
        "sweep_inf.yaml": b"name: s\nbase: configs/default.yaml\ngrid: {optim.lr: [.inf, 1]}\n",
        "sweep_bogus.yaml": b"name: s\nbase: configs/default.yaml\nbogus: 1\n",
        "sweep_escape.yaml": b"name: ../x\nbase: configs/default.yaml\ngrid: {run.seed: [1, 2]}\n",
        "meta_corrupt/meta.json": b'{"splits": ',
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    (root / "empty_dir").mkdir()
    for split in ("train", "val"):
        (root / "meta_corrupt" / f"{split}.bin").write_bytes(b"\x01\x00" * 64)
    (root / "nometrics" / "r1").mkdir(parents=True)
    shutil.copy(finished_run / "config.yaml", root / "nometrics" / "r1" / "config.yaml")
    shutil.copytree(finished_run, root / "damaged")
    for states in (root / "damaged" / "checkpoints" / "step_00000005").glob("*_states.pt"):
        states.write_bytes(states.read_bytes()[:100])
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, inputs: Path) -> Path:
    from data.text import prepare

    return prepare(inputs / "docs", tmp_path_factory.mktemp("data") / "prepared", num_proc=1)


@pytest.mark.parametrize(
    ("entry", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_changes_nothing(
    entry, args, expected, finished_run, inputs, dataset, tmp_path, capsys, monkeypatch
):
    if entry == "run" and "run.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    paths = {"run": finished_run, "data": dataset, "in": inputs, "tmp": tmp_path}
    argv = [arg.format(**paths) for arg in args]
    before = tree_hash(finished_run, dataset, inputs)
    holder = RunLock(finished_run).acquire() if entry == "locked" else None
    if entry in ("run", "fresh", "locked"):  # as far as a run's start: a process of its own
        run_dir = tmp_path / "fresh" if entry == "fresh" else finished_run
        env = cli_env()
        if "wandb.mode=online" in argv:  # no credentials anywhere
            env = {k: v for k, v in env.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
            env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path))
        try:
            proc = run_cli(*finished_run_args(run_dir), *argv, env=env)
        finally:
            if holder is not None:
                holder.release()
        status, err = proc.returncode, proc.stdout + proc.stderr
    else:
        monkeypatch.chdir(Path(__file__).resolve().parents[1])
        try:
            status = _mains()[entry](argv)
        except SystemExit as exit:  # argparse
            status = exit.code
        err = "".join(capsys.readouterr())
    lines = [line for line in err.splitlines() if ERROR_LINE.search(line)]
    assert status == 2, err[-3000:]
    assert len(lines) == 1 and expected in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert tree_hash(finished_run, dataset, inputs) == before

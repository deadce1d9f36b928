"""Run a grid of training configs: expand, name, validate, price, then submit.

    python -m launch.sweep configs/paper/adamw_wd.yaml --dry-run
    python -m launch.sweep configs/sweeps/cpu_adamw_wd.yaml --executor serial --yes
    python -m launch.sweep configs/paper/bf16_divergence.yaml --partition gpu --time 24:00:00

A sweep file (paths relative to it, or to the repo root):

    name: paper_adamw_wd              # runs go to <out>/<name>/<run name>, wandb group <name>
    base: ../gpt2_owt.yaml            # the config every run starts from
    extends: ../paper/adamw_wd.yaml   # optional: another sweep file's keys, merged under these
    overrides: {train.max_steps: 60}  # every run
    grid: {optim.weight_decay: [0, 0.1], run.seed: [1, 2]}      # cartesian product
    zip: {precision: [bf16, fp32], optim.weight_decay: [0, 0]}  # keys varying together
    slurm: {nodes: 1, gpus_per_node: 1, time: "24:00:00"}       # launch.slurm flag defaults
    tokens_per_second: 150000         # per GPU at the base config, for the GPU-hour estimate

Grid keys and zip groups (a mapping, or a list of them) are the product's axes in file order.
A run is named by the keys that vary (`wd0.1-bf16-lr1e-3-s1`); a zip group by as few of its
keys as tell its rows apart. `{out}` in a string value becomes the output directory (`--out`,
else the base's run.out_dir), so a sweep can point `checkpoint.init_from` at another's runs.
`extends` merges `overrides`, `grid` and `slurm` key by key (`null` deletes) and replaces the
rest. Every run's config is validated before anything is submitted; runs whose summary.json
says `completed` (at their max_steps) or `diverged` are skipped, unfinished ones resume
(`checkpoint.resume=auto`). Launcher flags go after SWEEP.yaml.

With `--executor slurm` the runs still to do go in as ONE job array, one array task per run
(`--array-parallelism P` runs at most P at once); each task saves and requeues itself on
preemption or at its time limit like a single `launch.slurm` job, and a rerun of the sweep
submits an array of only the runs not yet finished.
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import yaml

from checkpoint import layout
from common.files import write_text_atomic
from common.process import signal_on_parent_death
from configs import ConfigError, load_config, parse_override, read_yaml, to_yaml
from configs.schema import TrainConfig
from launch.cost import CPU_FLOPS_PER_S, Cost, estimate

REPO_ROOT = Path(__file__).resolve().parents[1]
EXECUTORS = ("slurm", "local", "debug", "serial")
SWEEP_KEYS = tuple("name base extends overrides grid zip slurm tokens_per_second".split())
MANIFEST = "sweep.yaml"
RESERVED = ("run.name", "run.out_dir", "wandb.group")  # the sweep sets these
# A torch.distributed rendezvous of this process must not leak into a child's.
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# key:label pairs for run names (others use the key's last part); no label: the value alone
SHORT = dict(
    pair.split(":")
    for pair in (
        "optim.weight_decay:wd optim.lr:lr optim.min_lr:minlr optim.grad_clip:clip optim.name: "
        "optim.schedule: precision: model.size: run.seed:s model.qk_layernorm:qkln model.z_loss:zl "
        "model.block_size:ctx model.n_layer:L model.n_embd:d optim.warmup_steps:wu "
        "train.max_steps:steps bf16_kernels:"
    ).split()
)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepError(ValueError):
    """A sweep that cannot run; the message is one line for the user."""


@dataclass(frozen=True)
class Axis:
    """One dimension of the product: a grid key, or a zip group of keys varying together."""

    keys: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def name_keys(self) -> tuple[str, ...]:
        """The fewest keys (in order, only those that vary) whose values tell the rows apart."""
        distinct = len(set(map(repr, self.rows)))
        chosen: list[int] = []
        for i in range(len(self.keys)):
            if len({repr(tuple(row[j] for j in chosen)) for row in self.rows}) == distinct:
                break
            if len({repr(row[i]) for row in self.rows}) > 1:
                chosen.append(i)
        return tuple(self.keys[i] for i in chosen)


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    path: Path
    base: Path
    overrides: dict[str, Any]
    axes: list[Axis]
    slurm: dict[str, Any] = field(default_factory=dict)
    tokens_per_second: float | None = None

    def base_config(self) -> TrainConfig:
        """The base config with the sweep's `overrides` (where `tokens_per_second` is measured)."""
        return load_config(self.base, [override_text(k, v) for k, v in self.overrides.items()])


@dataclass
class Run:
    """One expanded run: its name, the values it varies, its overrides, its validated config."""

    name: str
    values: dict[str, Any]
    overrides: list[str]  # what follows the base config in `python train.py BASE k=v ...`
    config: TrainConfig
    state: str = "new"  # new | resume | done
    steps_done: int = 0

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.out_dir) / self.config.run.name


# ------------------------------------------------------------------------------------------
# Reading a sweep file


def _number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as text; in a sweep it means the number."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value) if re.search(r"[.eE]", value) else int(value)
    return [_number(v) for v in value] if isinstance(value, list) else value


def _resolve(ref: Any, sweep_file: Path, what: str) -> Path:
    """A path relative to the sweep file that names it, else to the repo root."""
    if not isinstance(ref, str) or not ref:
        raise SweepError(f"{sweep_file}: '{what}' must be a path, got {ref!r}")
    path = Path(ref)
    for candidate in [path] if path.is_absolute() else [sweep_file.parent / path, REPO_ROOT / path]:
        if candidate.is_file():
            return Path(os.path.normpath(candidate))
    raise SweepError(f"{sweep_file}: {what} '{ref}' not found next to the file or in the repo")


def _read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping with `extends` merged in and `base` resolved."""
    if path.resolve() in chain:
        raise SweepError(f"{path}: 'extends' loops back to itself")
    try:
        data = read_yaml(path)
    except ConfigError as err:
        raise SweepError(str(err)) from None
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        allowed = ", ".join(SWEEP_KEYS)
        raise SweepError(f"{path}: unknown sweep key '{unknown[0]}' (allowed: {allowed})")
    if data.get("base") is not None:
        data["base"] = _resolve(data["base"], path, "base config")
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return data
    merged = _read_tree(_resolve(parent_ref, path, "extends"), (*chain, path.resolve()))
    for key, value in data.items():
        if value is None:
            merged.pop(key, None)
        elif key in ("overrides", "grid", "slurm") and isinstance(value, dict):
            section = {**(merged.get(key) or {}), **value}
            merged[key] = {k: v for k, v in section.items() if v is not None}
        else:
            merged[key] = value
    return merged


def _axes(data: dict[str, Any], path: Path) -> list[Axis]:
    """Grid keys (one-key groups) and zip groups, in file order."""
    groups: list[Any] = []
    for section in (k for k in data if k in ("grid", "zip")):
        value = data[section]
        if section == "grid" and isinstance(value, dict):
            groups += [{key: values} for key, values in value.items()]
        else:
            groups += value if section == "zip" and isinstance(value, list) else [value]
    axes = []
    for group in groups:
        if not isinstance(group, dict) or not group:
            raise SweepError(f"{path}: 'grid' and 'zip' must map dotted keys to lists of values")
        for key, values in group.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path}: '{key}' needs a non-empty list of values")
        if len({len(v) for v in group.values()}) != 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in group.items())
            raise SweepError(f"{path}: zipped lists must have equal lengths ({lengths})")
        rows = tuple(tuple(_number(v) for v in row) for row in zip(*group.values(), strict=True))
        if len(set(map(repr, rows))) < len(rows):
            raise SweepError(f"{path}: '{', '.join(group)}' lists the same value(s) twice")
        axes.append(Axis(tuple(group), rows))
    return axes


def load_sweep(path: str | Path) -> Sweep:
    """Parse a sweep file and check its shape (config keys are checked by `expand`)."""
    path = Path(path)
    data = _read_tree(path)
    name = data.get("name") or path.stem
    overrides = data.get("overrides") or {}
    slurm = data.get("slurm") or {}
    speed = _number(data.get("tokens_per_second"))
    if "base" not in data:
        raise SweepError(f"{path}: no 'base' config (e.g. base: ../gpt2_owt.yaml)")
    if not isinstance(name, str) or _UNSAFE.search(name) or name.startswith("."):
        raise SweepError(f"{path}: sweep name {name!r} may use only letters, digits and ._+-")
    if not isinstance(overrides, dict) or not isinstance(slurm, dict):
        raise SweepError(f"{path}: 'overrides' and 'slurm' must be mappings")
    if speed is not None and (not isinstance(speed, int | float) or speed <= 0):
        raise SweepError(f"{path}: tokens_per_second must be a positive number")
    axes = _axes(data, path)
    keys = [k for axis in axes for k in axis.keys]
    for key in [*overrides, *keys]:
        if key in RESERVED:
            raise SweepError(f"{path}: '{key}' is set by the sweep (run name, out dir, group)")
        if keys.count(key) > 1:
            raise SweepError(f"{path}: key '{key}' is in more than one grid/zip axis")
    overrides = {k: _number(v) for k, v in overrides.items()}
    return Sweep(name, path, data["base"], overrides, axes, slurm, speed)


# ------------------------------------------------------------------------------------------
# Expanding, naming, validating


def format_value(value: Any) -> str:
    """A value as a run name spells it: 1e-3, 0.1, 0, bf16, 0.9_0.95."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if not math.isfinite(value):  # refused when the run's config is validated
            return str(value)
        if value == 0 or (value.is_integer() and abs(value) < 1e6):
            return str(int(value))
        if 1e-2 <= abs(value) < 1e6:
            return f"{value:.4g}"
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, list | tuple):
        return "_".join(format_value(v) for v in value)
    return _UNSAFE.sub("_", str(value)).strip("._") or "_"


def name_part(key: str, value: Any) -> str:
    """`wd0.1`, `bf16`, `qkln` / `noqkln`: one key's share of a run name."""
    label = SHORT.get(key, key.rsplit(".", 1)[-1])
    if isinstance(value, bool) and label:
        return label if value else f"no{label}"
    return f"{label}{format_value(value)}"


def override_text(key: str, value: Any) -> str:
    """`key=value` that `configs.parse_override` reads back to `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _substitute(value: Any, out: str) -> Any:
    if isinstance(value, list):
        return [_substitute(v, out) for v in value]
    return value.replace("{out}", out) if isinstance(value, str) else value


def expand(sweep: Sweep, out: str | None = None) -> list[Run]:
    """Every run of the product, named, validated and with its state; SweepError names a bad run."""
    out = out or load_config(sweep.base).run.out_dir
    name_keys = [k for axis in sweep.axes for k in axis.name_keys()]
    for key in [*sweep.overrides, *(k for axis in sweep.axes for k in axis.keys)]:
        try:  # an unknown key fails once for the sweep, not once per run
            parse_override(f"{key}=0")
        except ConfigError as err:
            raise SweepError(f"sweep '{sweep.name}': {err}") from None
    common = {k: _substitute(v, out) for k, v in sweep.overrides.items()}
    runs: list[Run] = []
    for combo in itertools.product(*(axis.rows for axis in sweep.axes)):
        values = {
            k: _substitute(v, out)
            for axis, row in zip(sweep.axes, combo, strict=True)
            for k, v in zip(axis.keys, row, strict=True)
        }
        name = "-".join(name_part(k, values[k]) for k in name_keys) or "run"
        twin = next((r for r in runs if r.name == name), None)
        if twin is not None:
            raise SweepError(
                f"sweep '{sweep.name}': {twin.values} and {values} are both named '{name}'"
            )
        texts = [override_text(k, v) for k, v in {**common, **values}.items()]
        texts += [f"run.name={name}", f"run.out_dir={Path(out) / sweep.name}"]
        texts += [f"wandb.group={sweep.name}"]
        try:
            config = load_config(sweep.base, texts)
        except ConfigError as err:
            raise SweepError(f"sweep '{sweep.name}', run '{name}': {err}") from None
        run = Run(name, values, texts, config)
        run.state, run.steps_done = run_state(run.run_dir, config.train.max_steps)
        runs.append(run)
    return runs


def run_state(run_dir: Path, max_steps: int) -> tuple[str, int]:
    """('done' | 'resume' | 'new', the step it stands at) from the run directory's files.

    Done is read from summary.json: `diverged` counts as done (the run ended by its divergence
    policy, and resuming would go on past the stop, which is another experiment). Otherwise the
    step is the one a rerun really resumes from, its newest loadable checkpoint, which can lie
    behind the summary's steps (a run killed between two checkpoints); no checkpoint: 'new'.
    """
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict):
        steps = summary["steps"] if isinstance(summary.get("steps"), int) else 0
        status = summary.get("status")
        if status == "diverged" or (status == "completed" and steps >= max_steps):
            return "done", steps
    checkpoint = layout.latest(run_dir / "checkpoints")
    if checkpoint is None:
        return "new", 0
    return "resume", layout.step_of(checkpoint)  # killed, preempted, failed or grown


# ------------------------------------------------------------------------------------------
# Manifest and executors


def write_manifest(sweep: Sweep, runs: list[Run], out: str, executor: str) -> Path:
    """<out>/<sweep>/sweep.yaml: the expanded runs, their overrides and how they were started."""
    path = Path(out) / sweep.name / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep": sweep.name,
        "file": os.path.relpath(sweep.path),
        "base": os.path.relpath(sweep.base),
        "out": out,
        "executor": executor,
        "written": datetime.now().isoformat(timespec="seconds"),
        "overrides": sweep.overrides,
        "runs": [
            {
                "name": r.name,
                "run_dir": str(r.run_dir),
                "state": r.state,
                "values": r.values,
                "overrides": r.overrides,
                "command": shlex.join(
                    ["python", "train.py", os.path.relpath(sweep.base), *r.overrides]
                ),
            }
            for r in runs
        ],
    }
    write_text_atomic(path, yaml.safe_dump(manifest, sort_keys=False, width=1 << 20))
    return path


def _report(run: Run, index: int, total: int, seconds: float) -> str:
    """`[2/4] wd0.1-bf16: completed at step 60, loss 6.1234 (41 s)`, from summary.json."""
    try:
        s = json.loads((run.run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        s = {}
    loss = s.get("final_loss")
    loss = f", loss {loss:.4f}" if isinstance(loss, int | float) else ""
    status = f"{s.get('status', 'no summary')} at step {s.get('steps')}"
    return f"[{index}/{total}] {run.name}: {status}{loss} ({seconds:.0f} s)"


class Interrupted(Exception):
    """The sweep was told to stop (Ctrl-C, SIGTERM) and its current run has saved and ended."""

    def __init__(self, signum: int, line: str) -> None:
        super().__init__(line)
        self.signum = signum


@contextmanager
def forwarding_signals(child: subprocess.Popen) -> Iterator[list[int]]:
    """While inside, SIGINT and SIGTERM reach `child` (once each time they reach the sweep)
    instead of stopping the sweep; yields the signals received, in order.

    The child runs in its own session, so a terminal's Ctrl-C reaches the sweep alone and the
    child hears it exactly once, from here: a second SIGINT would make it quit without saving.
    """
    received: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_serial(sweep: Sweep, runs: list[Run]) -> int:
    """`python train.py` per run, in turn, output to RUN_DIR/train.log; returns the failures.

    A fresh process per run: a crash, leaked thread or process group cannot touch the next run.
    A signal to the sweep goes to its current run, which saves and stops; the sweep then raises
    `Interrupted` and starts no further run. The child also gets SIGTERM if the sweep dies
    without a word (SIGKILL), so that no orphan trains on beside a rerun of the sweep.
    """
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    failures = 0
    for i, run in enumerate(runs, 1):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log = run.run_dir / "train.log"
        command = [sys.executable, str(REPO_ROOT / "train.py"), str(sweep.base), *run.overrides]
        print(f"[{i}/{len(runs)}] {run.name}: {run.state}, log {log}", flush=True)
        start = time.time()
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(command)}\n")
            f.flush()
            child = subprocess.Popen(
                command,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=signal_on_parent_death,
            )
            with forwarding_signals(child) as received:
                code = child.wait()
        if received:
            raise Interrupted(received[0], _report(run, i, len(runs), time.time() - start))
        if code != 0:
            failures += 1
            last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
            print(f"[{i}/{len(runs)}] {run.name}: exit status {code}: {last}", flush=True)
        else:
            print(_report(run, i, len(runs), time.time() - start), flush=True)
    return failures


def submit_runs(runs: list[Run], options: Any, wait: bool) -> int:
    """SLURM: the runs as one job array (`launch.slurm.submit_array`); local and debug: one
    `launch.slurm.submit` after another, each run to its end, as they share this host."""
    from launch import slurm

    if options.executor == "slurm":
        sweep_dir = runs[0].run_dir.parent
        try:
            jobs = slurm.submit_array(
                [run.config for run in runs], options, sweep_dir / "submitit", sweep_dir.name
            )
        except Exception as err:  # sbatch said no (submitit's FailedSubmissionError): say why
            lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
            print(f"{len(runs)} run(s): submission failed: {lines[-1]}", flush=True)
            return len(runs)
        array = jobs[0].job_id.split("_")[0]
        pairs = list(enumerate(zip(runs, jobs, strict=True), 1))
        for i, (run, job) in pairs:
            print(f"[{i}/{len(runs)}] {run.name}: job {job.job_id} (array {array})", flush=True)
        return sum(_collect(i, len(runs), run, job) for i, (run, job) in pairs) if wait else 0
    failures = 0
    for i, run in enumerate(runs, 1):
        try:
            job = slurm.submit(run.config, dataclasses.replace(options))
        except Exception as err:  # a bad option or a failed start: say why
            failures += 1
            lines = [line for line in str(err).splitlines() if line.strip()] or [repr(err)]
            print(f"[{i}/{len(runs)}] {run.name}: submission failed: {lines[-1]}", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.name}: job {job.job_id} ({options.executor})", flush=True)
        failures += _collect(i, len(runs), run, job)  # debug runs in result()
    return failures


def _collect(index: int, total: int, run: Run, job: Any) -> int:
    start = time.time()
    try:
        results = job.results()
    except Exception as err:  # submitit's FailedJobError, or what the task raised (debug)
        lines = [line for line in str(err).splitlines() if line.strip()]
        print(f"[{index}/{total}] {run.name}: failed: {lines[-1] if lines else err}")
        return 1
    print(_report(run, index, total, time.time() - start), flush=True)
    summary = results[0] if results and isinstance(results[0], dict) else {}
    return 0 if summary.get("status") in ("completed", "diverged", "preempted") else 1


# ------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The sweep's own flags; the rest go to launch.slurm's parser (see `launch_options`)."""
    parser = _Parser(
        prog="launch.sweep",
        description="Expand a sweep file into runs, price it, then submit them.",
        epilog="Flags after SWEEP that are not listed here are launch.slurm's (--nodes, "
        "--gpus-per-node, --partition, --time, --wait, ...) and override the sweep's slurm:.",
    )
    parser.add_argument("sweep", help="sweep YAML (configs/paper/, configs/sweeps/)")
    parser.add_argument("--executor", choices=EXECUTORS, default="slurm")
    parser.add_argument("--dry-run", action="store_true", help="print configs and cost only")
    parser.add_argument("--yes", action="store_true", help="submit without asking")
    parser.add_argument("--out", help="parent of the sweep directory (default: base's out_dir)")
    parser.add_argument(
        "--cpu-gflops", type=float, help=f"CPU rate for the estimate ({CPU_FLOPS_PER_S / 1e9:g})"
    )
    parser.add_argument(
        "--array-parallelism",
        type=int,
        help="SLURM: array tasks (runs) running at once; default all",
    )
    return parser


# launch.slurm flag dests whose LaunchOptions field has another name
_FIELD_NAMES = {"time": "time_min", "mem": "mem_gb", "signal_delay": "signal_delay_s"}


def launch_options(executor: str, sweep: Sweep, argv: list[str]) -> tuple[Any, bool]:
    """(LaunchOptions, --wait) from the sweep's `slurm:` (SLURM only) and launch.slurm's flags."""
    from launch import slurm

    parser = slurm.build_parser()
    parser.prog = "launch.sweep"
    dests = vars(parser.parse_intermixed_args(["SWEEP"]))
    parser.set_defaults(**dict.fromkeys(dests))  # None: a flag that was not given
    given = vars(parser.parse_intermixed_args(["SWEEP", *argv]))
    if given.pop("overrides", None):
        raise SweepError(f"unexpected arguments '{' '.join(argv)}' (flags go after SWEEP.yaml)")
    wait = bool(given.pop("wait", None))
    fields = {f.name for f in dataclasses.fields(slurm.LaunchOptions)} - {"executor", "extra"}
    settings: dict[str, Any] = {}
    for key, value in sweep.slurm.items() if executor == "slurm" else ():
        if _FIELD_NAMES.get(key, key) not in fields:
            raise SweepError(f"{sweep.path}: unknown slurm option '{key}'")
        if key in ("time", "mem"):
            value = (slurm.parse_time_min if key == "time" else slurm.parse_mem_gb)(str(value))
        settings[_FIELD_NAMES.get(key, key)] = value
    for key, value in given.items():
        if value is not None and key not in ("config", "executor"):
            settings[_FIELD_NAMES.get(key, key)] = value
    return slurm.LaunchOptions(executor=executor, **settings), wait


def print_plan(sweep: Sweep, runs: list[Run], cost: Cost, out: str, ranks: int, full: bool):
    """One line per run (state, steps, tokens per step, estimate); with `full`, every config."""
    base = os.path.relpath(sweep.base)
    print(f"sweep {sweep.name}: {len(runs)} runs of {base} in {Path(out) / sweep.name}")
    for run in runs:
        t, seconds = run.config.train, cost.seconds.get(run.name, 0.0)
        tokens = t.micro_batch_size * t.grad_accum_steps * ranks * run.config.model.block_size
        state = {"done": "skip (finished)", "resume": f"resume at {run.steps_done}"}
        when = f"{seconds / 3600:.1f} GPU-h" if cost.gpu else f"{seconds / 60:.1f} min"
        when = "-" if run.state == "done" else when
        init_from = run.config.checkpoint.init_from
        missing = init_from and run.state == "new" and not Path(init_from).exists()
        line = f"  {run.name:<28} {state.get(run.state, 'new'):<16} {t.max_steps:>7} steps "
        print(f"{line}x {tokens:>9,} tok {when:>11}" + ("  (init_from missing)" if missing else ""))
    for i, run in enumerate(runs if full else [], 1):
        print(f"--- run {i}/{len(runs)}: {run.name} ({run.run_dir}) ---")
        print(to_yaml(run.config), end="")


def main(argv: list[str] | None = None) -> int:
    """Expand, validate, print the plan and cost, confirm, submit; 0 if every run went well."""
    args, rest = build_parser().parse_known_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        out = args.out or load_config(sweep.base).run.out_dir
        options, wait = None, False
        if args.executor != "serial":
            options, wait = launch_options(args.executor, sweep, rest)
            if args.array_parallelism is not None:
                options.array_parallelism = args.array_parallelism
            if not args.dry_run:
                options.check()  # e.g. no srun here: fail before anything else
        elif rest:
            raise SweepError(f"'{' '.join(rest)}': launcher flags need --executor slurm|local")
        runs = expand(sweep, out)
        ranks = 1  # serial and debug: one rank
        if options is not None and args.executor != "debug":
            ranks = options.nodes * options.num_tasks_per_node  # sets the global batch
        cost = estimate(runs, sweep, ranks, (args.cpu_gflops or 0) * 1e9)
        print_plan(sweep, runs, cost, out, ranks, full=args.dry_run)
        print(cost.line(runs, ranks))
        todo = [r for r in runs if r.state != "done"]
        if args.dry_run:
            return 0
        if not todo:
            print("nothing to do: every run has finished")
            return 0
        if not args.yes and not sys.stdin.isatty():
            raise SweepError("not submitting: no terminal to confirm on (pass --yes)")
        question = f"submit {len(todo)} run(s) with --executor {args.executor}? [y/N] "
        if not args.yes and input(question).strip().lower() not in ("y", "yes"):
            print("not submitted")
            return 1
    except (SweepError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"manifest {write_manifest(sweep, runs, out, args.executor)}")
    if args.executor == "serial":
        try:
            failures = run_serial(sweep, todo)
        except Interrupted as stop:  # the run has saved: one line, and the shell sees the signal
            print(f"{stop}; interrupted ({signal.Signals(stop.signum).name}): rerun to resume")
            return 128 + stop.signum
        except KeyboardInterrupt:  # between two runs: none was training
            print("interrupted between runs: rerun to go on", file=sys.stderr)
            return 130
    else:
        failures = submit_runs(todo, options, wait)
    if failures:
        print(f"{failures} of {len(todo)} run(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The checkpointer's file handling with a stand-in engine: atomicity, finding, retention,
verification, fallback; plus the preemption flag and the resume rules."""

import json
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from checkpoint.config import CheckpointConfig
from checkpoint.export import consolidated_state_dict
from checkpoint.manager import (
    HARNESS_FILE,
    KEEP_FILE,
    MANIFEST_FILE,
    Checkpointer,
    CheckpointError,
    _write_failure,
    load_rng_file,
    needs_universal,
    rng_state,
    set_rng_state,
    tag_for,
)
from checkpoint.preemption import PreemptionFlag
from checkpoint.resume import changed_keys, check_compatible, select_resume
from configs import load_config
from tests.helpers import finished_run_args, run_cli


class FileEngine:
    """Saves and loads one tensor the way DeepSpeed lays out a ZeRO-0 checkpoint."""

    def __init__(self, value: float = 0.0):
        self.weight = torch.full((64,), value)
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.weight.clone()}, path / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs) -> tuple[str, dict]:
        file = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
        self.weight = torch.load(file, weights_only=True)["module"]
        return str(file.parent), {}


def state(step: int) -> dict:
    return {
        "step": step,
        "tokens": 64 * step,
        "loader": {"position": step},
        "monitor": {},
        "optimizer": {"name": "adamw", "decoupled": True, "weight_decay": 0.1},
        "config": {},
        "world_size": 1,
        "zero_stage": 0,
    }


def make(tmp_path: Path, **cfg) -> Checkpointer:
    return Checkpointer(tmp_path, CheckpointConfig(**cfg), rank=0, world_size=1)


def save_steps(ckpt: Checkpointer, steps) -> None:
    for step in steps:
        ckpt.save(FileEngine(float(step)), state(step))


def steps_on_disk(ckpt: Checkpointer) -> list[int]:
    return [int(p.name[5:]) for p in ckpt.published()]


def test_save_publishes_complete_checkpoints_and_the_pointer(tmp_path):
    ckpt = make(tmp_path, keep_last=5)
    save_steps(ckpt, [0, 2])
    path = ckpt.dir / tag_for(2)
    assert (ckpt.dir / "latest").read_text() == tag_for(2)
    assert json.loads((path / HARNESS_FILE).read_text())["step"] == 2
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert set(manifest) == {"mp_rank_00_model_states.pt", "rng_rank0.pt"}
    assert manifest["rng_rank0.pt"]["bytes"] == (path / "rng_rank0.pt").stat().st_size
    assert not list(ckpt.dir.glob(".partial-*"))


def test_a_crashed_save_is_ignored_then_cleaned(tmp_path):
    ckpt = make(tmp_path, keep_last=5)
    save_steps(ckpt, [0, 2])
    # a save killed midway: DeepSpeed's files written, no harness, never renamed
    FileEngine(4.0).save_checkpoint(str(ckpt.dir), ".partial-" + tag_for(4), False)
    assert ckpt.latest() == ckpt.dir / tag_for(2)
    assert ckpt.candidates() == [ckpt.dir / tag_for(2), ckpt.dir / tag_for(0)]
    engine = FileEngine()
    assert ckpt.resume(engine, ckpt.candidates())[1]["step"] == 2
    assert torch.equal(engine.weight, torch.full((64,), 2.0))
    save_steps(ckpt, [4])
    assert not list(ckpt.dir.glob(".partial-*"))
    assert steps_on_disk(ckpt) == [0, 2, 4]


def test_latest_pointer_to_a_missing_checkpoint_falls_back_to_the_newest(tmp_path):
    ckpt = make(tmp_path, keep_last=5)
    save_steps(ckpt, [0, 2, 4])
    (ckpt.dir / "latest").write_text(tag_for(6))
    assert ckpt.candidates()[0] == ckpt.dir / tag_for(4)
    (ckpt.dir / "latest").unlink()
    assert ckpt.latest() == ckpt.dir / tag_for(4)


def test_checkpoints_newer_than_latest_are_abandoned_ones(tmp_path):
    """After a rollback the loop saves step 4 again; step 6 is from the dropped trajectory."""
    ckpt = make(tmp_path, keep_last=5)
    save_steps(ckpt, [0, 2, 4, 6, 4])
    assert ckpt.candidates() == [ckpt.dir / tag_for(s) for s in (4, 2, 0)]


def test_retention_keeps_the_last_k_pinned_and_milestones(tmp_path):
    ckpt = make(tmp_path, keep_last=2, milestone_interval=4)
    save_steps(ckpt, range(0, 2))
    ckpt.pin(ckpt.dir / tag_for(1), "last good before the detection at step 2")
    ckpt.pin(ckpt.dir / tag_for(1), "last good before the detection at step 2")
    save_steps(ckpt, range(2, 11))
    assert steps_on_disk(ckpt) == [1, 4, 8, 9, 10]
    keep = (ckpt.dir / tag_for(1) / KEEP_FILE).read_text()
    assert keep == "last good before the detection at step 2\n"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-10]), "truncated"),
        (lambda f: f.write_bytes(f.read_bytes()[:-10] + b"\0" * 10), "CRC32"),
        (lambda f: f.unlink(), "missing"),
    ],
)
def test_damage_is_found_before_loading_and_the_previous_one_loads(tmp_path, damage, message):
    ckpt = make(tmp_path, keep_last=5)
    save_steps(ckpt, [0, 2])
    damage(ckpt.dir / tag_for(2) / "mp_rank_00_model_states.pt")
    engine = FileEngine()
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(engine, ckpt.dir / tag_for(2))
    with pytest.warns(UserWarning, match=f"{message}.*trying the previous checkpoint"):
        path, loaded = ckpt.resume(engine, ckpt.candidates())
    assert path == ckpt.dir / tag_for(0) and loaded["step"] == 0
    assert torch.equal(engine.weight, torch.zeros(64))


def test_none_loading_is_one_line_error(tmp_path):
    ckpt = make(tmp_path, keep_last=5)
    save_steps(ckpt, [0, 2])
    for path in ckpt.published():
        (path / "mp_rank_00_model_states.pt").unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as err:
        ckpt.resume(FileEngine(), ckpt.candidates())
    assert "\n" not in str(err.value) and "could be loaded" in str(err.value)


def test_select_resume_skips_unreadable_harness_but_never_starts_afresh(tmp_path):
    cfg = load_config(None, [f"run.out_dir={tmp_path}", "run.name=run"])
    ckpt = Checkpointer(tmp_path / "run", cfg.checkpoint, rank=0, world_size=1)
    assert select_resume(ckpt, cfg, 1) == []
    for step in (0, 2):
        engine = FileEngine()
        ckpt.save(engine, {**state(step), "config": cfg.model_dump(mode="json")})
    (ckpt.dir / tag_for(2) / HARNESS_FILE).write_text("{")
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        assert select_resume(ckpt, cfg, 1) == [ckpt.dir / tag_for(0)]
    (ckpt.dir / tag_for(0) / HARNESS_FILE).unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none has a readable"):
        select_resume(ckpt, cfg, 1)
    cfg.checkpoint.resume = "never"  # a fresh start over them: refused, or the run moved aside
    with pytest.raises(CheckpointError, match="already holds a run .checkpoints.; checkpoint"):
        select_resume(ckpt, cfg, 1)
    cfg.run.move_aside = True
    with pytest.warns(UserWarning, match="moved the earlier run"):
        assert select_resume(ckpt, cfg, 1) == []
    assert not ckpt.dir.exists() and (tmp_path / "run.old-1" / "checkpoints" / tag_for(2)).is_dir()


def test_changed_keys_allow_harmless_and_world_size_changes():
    saved = load_config(None, ["train.micro_batch_size=4"]).model_dump(mode="json")
    saved["world_size"] = 1
    harmless = ["train.max_steps=9", "train.log_interval=1", "train.eval_interval=3"]
    assert changed_keys(saved, load_config(None, harmless + ["train.micro_batch_size=4"]), 1) == []
    assert changed_keys(saved, load_config(None, ["train.micro_batch_size=2"]), 2) == []
    assert changed_keys(saved, load_config(None, ["train.micro_batch_size=1"]), 2) == [
        "global batch (train.micro_batch_size x train.grad_accum_steps x ranks)"
    ]
    changed = changed_keys(saved, load_config(None, ["train.micro_batch_size=4", "run.seed=1"]), 1)
    assert changed == ["run.seed (1337 -> 1)"]


def test_check_compatible_is_overridden_by_force_resume():
    saved = {"config": load_config(None, []).model_dump(mode="json"), "world_size": 1}
    with pytest.raises(CheckpointError, match=r"optim.name \('adamw' -> 'adam_l2'\)"):
        check_compatible(saved, load_config(None, ["optim.name=adam_l2"]), 1, Path("ckpt"))
    forced = load_config(None, ["optim.name=adam_l2", "checkpoint.force_resume=true"])
    check_compatible(saved, forced, 1, Path("ckpt"))


@pytest.mark.parametrize(
    "saved_ranks, saved_stage, ranks, stage, expected",
    [(2, 1, 1, 1, True), (1, 3, 2, 3, True), (2, 2, 2, 2, False), (2, 0, 1, 0, False)],
)
def test_needs_universal(saved_ranks, saved_stage, ranks, stage, expected):
    harness = {**state(0), "world_size": saved_ranks, "zero_stage": saved_stage}
    assert needs_universal(harness, ranks, stage) is expected


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_flag_catches_the_scheduler_signals(sig):
    before = signal.getsignal(sig)
    flag = PreemptionFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), sig)
        assert flag.requested and flag.signal_name == sig.name
    finally:
        flag.uninstall()
    assert signal.getsignal(sig) == before


class _Payload:
    """Unpickling it creates a file: what a checkpoint from elsewhere could make torch.load do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_rng_and_zero0_weights_load_weights_only(tmp_path):
    """RNG states load weights-only (numpy's generator state allowed), so a planted object is a
    one-line CheckpointError and runs nothing; so does a ZeRO 0 model file given to export."""
    good = tmp_path / "rng_rank0.pt"
    torch.save(rng_state(), good)
    set_rng_state(load_rng_file(good))
    marker = tmp_path / "ran"
    torch.save({"torch": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is not a loadable RNG state"):
        load_rng_file(tmp_path / "evil.pt")

    ckpt = tmp_path / "checkpoints" / tag_for(3)
    ckpt.mkdir(parents=True)
    (ckpt / HARNESS_FILE).write_text(json.dumps({"zero_stage": 0, "step": 3}))
    torch.save({"module": _Payload(marker)}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="cannot consolidate checkpoint .*Weights only"):
        consolidated_state_dict(ckpt)
    assert not marker.exists()


@contextmanager
def small_disk(path: Path, size_bytes: int):
    """A tmpfs of `size_bytes` at `path`; the test skips where mounting is not allowed."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow
def test_a_full_disk_ends_the_run_failed_in_one_line(tmp_path):
    """issue 22: a save that fills the disk used to end in 55 lines of chained traceback whose
    last line was the summary's own ENOSPC, with `running` left in summary.json and a 0-byte
    summary.json.partial beside it. Now: exit 2, one line naming the save and what is intact,
    `failed` with that line in summary.json, and no partial file anywhere."""
    reference = tmp_path / "ref" / "run"
    args = {"train.max_steps": 4, "checkpoint.interval": 2, "checkpoint.keep_last": 3}
    assert run_cli(*finished_run_args(reference, **args)).returncode == 0
    first = checkpoint_bytes(reference / "checkpoints" / tag_for(0))
    later = checkpoint_bytes(reference / "checkpoints" / tag_for(2))
    cases = [  # (disk size, the save that fails, what the message says is intact)
        (first + later // 2 + (1 << 20), 2, f"{tag_for(0)} is intact"),
        (first // 2, 0, "no earlier one exists"),
    ]
    for number, (size, failing, intact) in enumerate(cases):
        with small_disk(tmp_path / f"disk{number}", size) as disk:
            run_dir = disk / "run"
            proc = run_cli(*finished_run_args(run_dir, **args))
            assert proc.returncode == 2, proc.stderr[-2000:]
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and f"could not save checkpoint {tag_for(failing)}" in lines[0]
            assert intact in lines[0]
            summary = json.loads((run_dir / "summary.json").read_text())
            assert summary["status"] == "failed" and "could not save" in summary["error"]
            assert not [p for p in run_dir.rglob("*") if "partial" in p.name]
            if failing:
                assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag_for(0)


# ----------------------------------------------- across devices and optimizer kinds (real engine)


def real_engine(dist_env, zero_stage: int = 0):
    """A tiny GPT on our engine after two updates; (engine, optimizer, config)."""
    from model import GPT
    from optim.engine import initialize
    from tests.helpers import tiny_overrides

    cfg = load_config(None, tiny_overrides(zero_stage=zero_stage))
    torch.manual_seed(cfg.run.seed)
    engine, optimizer = initialize(GPT(cfg.model), cfg, 1, dist_env.device)
    for seed in (1, 2):
        engine_step(engine, seed)
    return engine, optimizer, cfg


def engine_step(engine, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 128, (2, 4, 16), generator=gen)
    engine.backward(engine(x, y).loss)
    engine.step()


def rewrite(file: Path, obj) -> None:
    """Replace a checkpoint file, with a manifest that agrees (as a save elsewhere would)."""
    torch.save(obj, file)
    agree(file)


def agree(file: Path) -> None:
    """Make the manifest agree with `file` as it is now."""
    from checkpoint.manager import file_crc32

    manifest = json.loads((file.parent / MANIFEST_FILE).read_text())
    manifest[file.name] = {"bytes": file.stat().st_size, "crc32": file_crc32(file)}
    (file.parent / MANIFEST_FILE).write_text(json.dumps(manifest))


def as_saved_on_gpu(file: Path) -> None:
    """Make a torch file's tensors say they were saved on cuda:0, as a GPU rank's would: such a
    file loads on a machine without CUDA only with a map_location."""
    import zipfile

    with zipfile.ZipFile(file) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    pickle = next(name for name in entries if name.endswith("/data.pkl"))
    cpu, gpu = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"  # pickled str: length, text
    assert cpu in entries[pickle]
    entries[pickle] = entries[pickle].replace(cpu, gpu)
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    agree(file)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(file, weights_only=True)


def test_ema_saved_on_a_gpu_loads_onto_the_engines_device(dist_env, tmp_path):
    from optim.ema import WeightEMA

    engine, _, _ = real_engine(dist_env)
    ema = WeightEMA(engine.module, 0.9)
    ema.update()
    ckpt = make(tmp_path)
    ckpt.track("ema", ema)
    path = ckpt.save(engine, state(2))
    saved = [e.clone() for e in ema.shadow]
    as_saved_on_gpu(path / "ema.pt")
    for e in ema.shadow:
        e.zero_()
    ckpt.load(engine, path)
    assert all(torch.equal(e, s) for e, s in zip(ema.shadow, saved, strict=True))


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_rollback_restores_the_step_an_optimizer_keeps_in_its_groups(
    dist_env, tmp_path, zero_stage
):
    """FusedAdam counts its steps in the param groups: a load (an in-process rollback) must
    bring back the checkpoint's count, not keep the later one the groups held before it."""
    engine, _, _ = real_engine(dist_env, zero_stage)
    for group in engine.optimizer.param_groups:
        group["step"] = 2
    ckpt = make(tmp_path)
    path = ckpt.save(engine, {**state(2), "zero_stage": zero_stage})
    for group in engine.optimizer.param_groups:
        group["step"] = 5  # three steps later, then the rollback
    ckpt.load(engine, path)
    assert [g["step"] for g in engine.optimizer.param_groups] == [2, 2]


def test_a_fused_adam_checkpoint_loads_into_torch_adamw(dist_env, tmp_path):
    """FusedAdam's layout (no per-parameter `step`, the count in each group) loads into torch's
    AdamW on a CPU, and the next update is the one from torch's own layout, to the bit."""
    engine, _, _ = real_engine(dist_env)
    ckpt = make(tmp_path)
    path = ckpt.save(engine, state(2))
    model_file = path / "mp_rank_00_model_states.pt"
    updated = {}
    for layout in ("torch", "fused_adam"):
        if layout == "fused_adam":
            saved = torch.load(model_file, weights_only=False)
            for param_state in saved["optimizer"]["state"].values():
                del param_state["step"]
            for group in saved["optimizer"]["param_groups"]:
                group["step"] = 2
            rewrite(model_file, saved)
        fresh, _, _ = real_engine(dist_env)
        ckpt.load(fresh, path)
        engine_step(fresh, 3)
        updated[layout] = [p.detach().clone() for p in fresh.module.parameters()]
    assert all(map(torch.equal, updated["torch"], updated["fused_adam"]))


@pytest.mark.parametrize(
    ("saved_stage", "stage", "fits"),
    [(0, 0, True), (1, 2, True), (3, 1, True), (0, 2, False), (2, 0, False)],
)
def test_optimizer_state_crosses_between_zero_1_to_3_only(saved_stage, stage, fits):
    from checkpoint.resume import optimizer_state_fits

    assert optimizer_state_fits({**state(2), "zero_stage": saved_stage}, stage) == fits


def test_zero_stage_unset_is_zero_on_one_rank_and_the_resumed_stage_on_resume(tmp_path):
    """Set in the config file or on the command line, the stage is the user's; unset, one rank
    runs ZeRO 0, several the schema's default, and a resume the stage it was saved with."""
    from checkpoint.resume import choose_zero_stage

    ckpt = make(tmp_path)
    cfg, note = choose_zero_stage(load_config(None, []), 1, ckpt)
    assert (cfg.zero_stage, note) == (0, " (chosen for one rank; set zero_stage to choose)")
    assert choose_zero_stage(load_config(None, []), 2, ckpt)[0].zero_stage == 1
    assert choose_zero_stage(load_config(None, ["zero_stage=1"]), 1, ckpt)[0].zero_stage == 1
    file = tmp_path / "c.yaml"
    file.write_text("zero_stage: 2\n")
    assert choose_zero_stage(load_config(file, []), 1, ckpt)[0].zero_stage == 2

    saved = ckpt.dir / tag_for(4)
    saved.mkdir(parents=True)
    (saved / HARNESS_FILE).write_text(json.dumps({**state(4), "zero_stage": 1}))
    cfg, note = choose_zero_stage(load_config(None, []), 1, ckpt)
    assert (cfg.zero_stage, note) == (
        1,
        " (as the checkpoint it resumes; set zero_stage to choose)",
    )
    fresh = load_config(None, ["checkpoint.resume=never"])
    assert choose_zero_stage(fresh, 1, ckpt)[0].zero_stage == 0


def test_only_a_failed_write_becomes_a_save_error(tmp_path):
    """A RuntimeError from anywhere but torch's writer is a bug to see whole, not a full disk."""
    assert _write_failure(RuntimeError("a bug"), tmp_path) is None
    no_space = OSError(28, "No space left on device")
    assert _write_failure(no_space, tmp_path) == "[Errno 28] No space left on device"

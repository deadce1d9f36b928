"""Every YAML under configs/ loads (sweeps through the sweep loader, each run validated), and the
paper presets say what reference/paper.md says."""

from pathlib import Path

import pytest

from configs import load_config, read_yaml
from launch.sweep import expand, load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_YAML = sorted(CONFIGS.rglob("*.yaml"))


def is_sweep(path: Path) -> bool:
    """Sweep files name a base config (or extend another sweep); presets are configs."""
    return bool({"base", "extends"} & set(read_yaml(path)))


def test_the_tree_holds_presets_paper_experiments_and_sweeps():
    names = {str(p.relative_to(CONFIGS)) for p in ALL_YAML}
    assert {"default.yaml", "gpt2_owt.yaml", "gpt2_owt_bf16_divergence.yaml"} <= names
    assert any(n.startswith("paper/") for n in names)
    assert any(n.startswith("sweeps/proxy_") for n in names)
    # every file in paper/ and sweeps/ is a sweep; every other file is a preset
    for path in ALL_YAML:
        assert is_sweep(path) == (path.parent.name in ("paper", "sweeps")), path


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_yaml_loads(path, tmp_path):
    if not is_sweep(path):
        load_config(path)
        return
    sweep = load_sweep(path)
    load_config(sweep.base)  # the sweep's base file on its own
    runs = expand(sweep, str(tmp_path))  # every run's config, validated
    assert runs and len({r.name for r in runs}) == len(runs)


def test_paper_preset_is_the_papers_setup():
    cfg = load_config(CONFIGS / "gpt2_owt.yaml")
    m, o, t = cfg.model, cfg.optim, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias) == (12, 12, 768, 256, False)
    assert (o.name, o.lr, o.min_lr, o.warmup_steps, o.schedule) == (
        "adamw",
        6e-4,
        6e-5,
        400,
        "cosine",
    )
    assert (o.betas, o.eps, o.grad_clip, o.weight_decay) == ((0.9, 0.95), 1e-8, 1.0, 0.1)
    assert t.max_steps == 50_000
    assert t.micro_batch_size * t.grad_accum_steps == 256  # sequences per step on one GPU
    assert t.micro_batch_size * t.grad_accum_steps * m.block_size == 65_536  # tokens per step
    assert (cfg.precision, cfg.zero_stage, cfg.data.dataset) == ("bf16", 1, "openwebtext")
    assert t.eval_interval == 1000 and cfg.checkpoint.interval == 1000


def test_divergence_preset_is_the_papers_bf16_setup():
    cfg = load_config(CONFIGS / "gpt2_owt_bf16_divergence.yaml")
    assert (cfg.optim.lr, cfg.model.block_size, cfg.optim.weight_decay) == (1e-3, 1024, 0.0)
    assert cfg.precision == "bf16" and cfg.model.n_layer == 12 and not cfg.model.bias
    assert cfg.train.micro_batch_size * cfg.train.grad_accum_steps == 256
    assert cfg.divergence.policy == "record"  # the study needs the curve after a divergence


def test_paper_sweeps_vary_what_the_paper_varies(tmp_path):
    def grid(name: str) -> list:
        return expand(load_sweep(CONFIGS / "paper" / f"{name}.yaml"), str(tmp_path))

    assert [r.config.optim.weight_decay for r in grid("adamw_wd")] == [0.0, 0.1, 0.3]
    l2 = grid("adam_l2")
    assert {(r.config.optim.name, r.config.optim.l2_form) for r in l2} == {("adam_l2", "loss")}
    coefficients = [r.config.optim.weight_decay for r in l2]
    assert min(coefficients) == 1e-6 and max(coefficients) == 1e-3
    divergence = grid("bf16_divergence")
    variants = {(r.config.precision, r.config.optim.weight_decay) for r in divergence}
    assert variants == {("bf16", 0.0), ("fp32", 0.0), ("bf16", 0.1)}
    assert {r.config.run.seed for r in divergence} == {1, 2, 3}
    for run in grid("finetune_small_lr"):
        o = run.config.optim
        assert (o.lr, o.min_lr, o.schedule, o.warmup_steps) == (1e-5, 1e-5, "constant", 0)
        assert run.config.train.max_steps == 10_000
        source = f"paper_adamw_wd/{run.name}/checkpoints/step_00050000"
        assert run.config.checkpoint.init_from == str(tmp_path / source)
    # the paper's definitions: the EMA's loss (0.99) beside the model's in every experiment
    for name in ("adamw_wd", "adam_l2", "bf16_divergence", "finetune_small_lr"):
        assert {r.config.train.ema for r in grid(name)} == {0.99}, name


@pytest.mark.parametrize(
    ("overrides", "shape"),
    [
        (["model.size=gpt2"], (12, 12, 768)),  # the default config spells out 4 x 4 x 128
        (["model.size=gpt2-medium"], (24, 16, 1024)),
        (["model.size=gpt2", "model.n_layer=3"], (3, 12, 768)),  # the command line's own win
        (["model.n_layer=3", "model.size=gpt2"], (3, 12, 768)),
        (["model.n_embd=256"], (4, 4, 256)),  # no preset asked: the file's shape stays
    ],
)
def test_a_preset_on_the_command_line_replaces_the_files_shape(overrides, shape):
    """issue 22: `model.size=gpt2` with the default config used to train 4 x 4 x 128."""
    model = load_config(None, overrides).model
    assert (model.n_layer, model.n_head, model.n_embd) == shape


def test_a_preset_in_the_file_gives_way_to_the_files_own_sizes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  size: gpt2\n  n_layer: 2\n")
    model = load_config(path).model
    assert (model.n_layer, model.n_head, model.n_embd) == (2, 12, 768)


def test_compile_defaults_to_on_for_cuda_and_off_for_cpu():
    from configs import load_config

    unset = load_config(None, []).train
    assert (unset.compiles("cuda"), unset.compiles("cpu")) == (True, False)
    off = load_config(None, ["train.compile=false"]).train
    assert (off.compiles("cuda"), off.compiles("cpu")) == (False, False)
    assert load_config(None, ["train.compile=true"]).train.compiles("cpu")

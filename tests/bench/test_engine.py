"""`python -m bench.engine` compares equal work: the two steps end on the same loss."""

from pathlib import Path

import pytest

from bench.engine import bench_config, build_parser, main


def test_bench_runs_both_steps_on_the_same_work(dist_env, capsys):
    args = ["--model", "tiny", "--micro-batch-size", "2", "--steps", "2", "--warmup", "1"]
    figures = main(args)
    # 3 identical fp32 AdamW updates from identical weights: the same loss to float precision
    assert figures["engine_final_loss"] == pytest.approx(figures["reference_final_loss"], abs=1e-5)
    assert figures["reference_tok_per_s"] > 0 and figures["engine_tok_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["engine_tok_per_s"] / figures["reference_tok_per_s"]
    )
    assert figures["engine_mfu"] is None  # no peak FLOPs known for a CPU
    assert "ratio ours / reference" in capsys.readouterr().out


def test_sweep_flag_times_the_sweeps_model() -> None:
    sweep = Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "stream_wd.yaml"
    cfg = bench_config(build_parser().parse_args(["--sweep", str(sweep)]))
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.vocab_size, m.block_size) == (2, 64, 2048, 128)
    assert cfg.train.micro_batch_size == 32 and cfg.precision == "fp32"


@pytest.mark.parametrize(
    ("args", "shape"),
    [
        (["--vocab-size", "50304"], (4, 128, 50304, 128)),  # issue 24's CPU comparison
        (["--model", "gpt2"], (12, 768, 10240, 1024)),  # the preset replaces the file's shape
    ],
)
def test_bench_model_flags(args, shape):
    m = bench_config(build_parser().parse_args(args)).model
    assert (m.n_layer, m.n_embd, m.vocab_size, m.block_size) == shape


@pytest.mark.parametrize(("args", "stage"), [([], 0), (["--zero-stage", "1"], 1)])
def test_bench_times_the_stage_a_run_on_one_rank_would_choose(args, stage):
    assert bench_config(build_parser().parse_args(args)).zero_stage == stage

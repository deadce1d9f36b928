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

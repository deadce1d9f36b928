"""`python -m bench.gpu_check` on a CPU: its arguments, the one-line exit without CUDA, and the
JSON it writes (from fake figures, and from a tiny CPU run of the benchmark part)."""

import json

import pytest
import torch

from bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("bench.gpu_check: no CUDA device (torch ")
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: --out"),
        (["--out", "x.json", "--steps", "0"], "expected a positive integer, got '0'"),
        (["--out", "x.json", "--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_settings_cover_torch_and_each_zero_stage_with_and_without_the_monitor():
    names = [s.name for s in gpu_check.settings(True)]
    assert names == [
        "torch_eager",
        "torch_compiled",
        "harness_zero0",
        "harness_zero0_monitor",
        "harness_zero1",
        "harness_zero1_monitor",
        "harness_zero2",
        "harness_zero2_monitor",
    ]
    assert [s.compile for s in gpu_check.settings(True)] == [False] + [True] * 7
    assert not any(s.compile for s in gpu_check.settings(False))
    cfg = gpu_check.config(
        gpu_check.build_parser().parse_args(["--out", "x"]), gpu_check.settings(True)[4]
    )
    m = cfg.model
    assert (m.n_layer, m.n_embd, m.vocab_size, m.block_size) == (12, 768, 50304, 1024)
    assert (cfg.train.micro_batch_size, cfg.precision, cfg.zero_stage) == (16, "bf16", 1)


def test_report_from_fake_figures():
    def figures(step_s: float) -> dict:
        reads = {"deepspeed": 0.0, "torch": 0.0, "harness": 1.0}
        return {"step_s": step_s, "peak_mem_mb": 9000.0, "host_reads_per_step": reads}

    fake = {"torch_compiled": figures(0.04), "harness_zero0": figures(0.032)}
    result = gpu_check.report({"device": "NVIDIA H100 80GB HBM3"}, None, fake, 16384, 1e9, 989e12)
    assert set(result) == {"device", "tests", "settings", "ratios"}
    zero0 = result["settings"]["harness_zero0"]
    assert zero0["tok_per_s"] == pytest.approx(16384 / 0.032)
    assert zero0["step_ms"] == pytest.approx(32.0)
    assert zero0["mfu"] == pytest.approx(1e9 * 16384 / 0.032 / 989e12)
    assert zero0["host_reads_per_step"]["harness"] == 1.0 and "step_s" not in zero0
    assert result["ratios"] == {"harness_zero0_vs_torch_compiled": pytest.approx(1.25)}
    json.dumps(result)  # plain JSON


def test_a_tiny_cpu_check_writes_every_figure(dist_env, tmp_path, monkeypatch, capsys):
    """The benchmark part on a CPU, plain torch and the harness on ZeRO 0: the JSON has every
    figure of each, and the host reads are the ones tests/trainer/test_step.py asserts (ZeRO 0:
    the gate's read only; torch's foreach Adam reads its CPU step counters, no sync)."""
    chosen = [s for s in gpu_check.settings(False) if s.name in ("torch_eager", "harness_zero0")]
    monkeypatch.setattr(gpu_check, "settings", lambda compile_: chosen)
    out = tmp_path / "check.json"
    argv = ["--device", "cpu", "--model", "tiny", "--precision", "fp32", "--steps", "2"]
    assert gpu_check.main([*argv, "--no-compile", "--skip-tests", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["tests"] is None
    assert result["batch"] == [8, 64] and result["precision"] == "fp32"
    assert set(result["settings"]) == {"torch_eager", "harness_zero0"}
    for figures in result["settings"].values():
        assert figures["tok_per_s"] > 0 and figures["mfu"] is None and figures["compile"] is False
        assert figures["peak_mem_mb"] is None and figures["cuda_syncs_per_step"] is None
    assert result["settings"]["torch_eager"]["host_reads_per_step"]["harness"] == 0
    reads = result["settings"]["harness_zero0"]["host_reads_per_step"]
    assert (reads["deepspeed"], reads["harness"]) == (0, 1)
    assert result["ratios"] == {}  # no compiled torch setting to compare with
    assert f"wrote {out}" in capsys.readouterr().out

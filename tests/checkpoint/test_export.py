"""fp32 export of real checkpoints (ZeRO 0 on one rank, ZeRO 3 sharded over two) to a torch
state dict and to a Hugging Face GPT-2 directory that transformers runs to the same logits."""

import json
import subprocess
import sys

import pytest
import torch

from checkpoint.export import consolidated_state_dict, find_checkpoint, main, model_config
from model import GPT
from tests.checkpoint import runs

transformers = pytest.importorskip("transformers")

RUN_SETS = {"zero0-1rank": (0, 1), "zero3-2ranks": (3, 2)}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tokens() -> torch.Tensor:
    return torch.randint(0, 10240, (2, 16), generator=torch.Generator().manual_seed(0))  # the vocab


def our_logits(checkpoint) -> torch.Tensor:
    """Our GPT with the checkpoint's consolidated weights, built from its saved config."""
    model = GPT(model_config(checkpoint))
    model.load_state_dict(consolidated_state_dict(checkpoint))
    with torch.no_grad():
        return model.eval()(tokens()).logits


@pytest.mark.slow
@pytest.mark.parametrize("run_set", list(RUN_SETS))
def test_export_round_trips_through_torch_and_transformers(training_runs, tmp_path, run_set):
    run_dir = training_runs.get(*RUN_SETS[run_set]).reference
    checkpoint = find_checkpoint(run_dir, 6)
    expected = our_logits(checkpoint)

    assert main([str(run_dir), "--step", "6", "--to", "torch", "--out", str(tmp_path / "pt")]) == 0
    state = torch.load(tmp_path / "pt" / "model.pt", weights_only=True)
    reference = consolidated_state_dict(checkpoint)
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    meta = json.loads((tmp_path / "pt" / "config.json").read_text())
    assert meta["step"] == 6 and meta["model"]["n_embd"] == 16

    # defaults: the latest checkpoint, into RUN_DIR/export/...; once as the real command line
    argv = [str(run_dir), "--to", "hf"]
    if run_set == "zero0-1rank":
        result = subprocess.run(
            [sys.executable, "-m", "checkpoint.export", *argv],
            cwd=runs.REPO,
            env=runs.env(1),
            capture_output=True,
            text=True,
            timeout=runs.TIMEOUT_S,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert main(argv) == 0
    hf_dir = run_dir / "export" / "step_00000008-hf"
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_logits = hf(tokens()).logits
    latest = our_logits(find_checkpoint(run_dir))
    torch.testing.assert_close(hf_logits, latest, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hf_logits, expected)  # step 8 is not step 6

    assert main([str(run_dir), "--step", "6", "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--to", "torch"]) == 2
    nowhere = tmp_path / "nowhere"
    assert capsys.readouterr().err == f"error: run directory {nowhere} does not exist\n"
    assert main([str(tmp_path), "--to", "hf"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} has no complete checkpoint")


@pytest.mark.slow
def test_export_of_a_missing_step_lists_the_steps(training_runs, capsys):
    run_dir = training_runs.get(0).reference
    assert main([str(run_dir), "--step", "5", "--to", "torch"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {run_dir} has no checkpoint at step 5 (steps: 6, 8)\n"

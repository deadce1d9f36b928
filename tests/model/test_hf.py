"""HF GPT-2 import/export, checked against `transformers` itself (a test-only dependency)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model import GPT, ModelConfig
from model.hf import (
    config_from_hf,
    export_hf_gpt2,
    export_hf_state_dict,
    import_hf_state_dict,
    load_hf_gpt2,
)

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=100)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the network: every directory is local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Noise on every tensor, so biases and LayerNorm gains are not their trivial 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture
def hf_model() -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SMALL, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    perturb(model, seed=1)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(2))


def hf_logits(directory: Path) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(tokens()).logits


def our_logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens()).logits


def our_config(**overrides: object) -> ModelConfig:
    return ModelConfig(size="tiny", block_size=32, vocab_size=100, **overrides)


def test_import_matches_transformers_logits(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path)
    model = load_hf_gpt2(tmp_path)
    assert model.config.bias and model.config.block_size == 32 and model.config.n_embd == 64
    with torch.no_grad():
        expected = hf_model(tokens()).logits
    torch.testing.assert_close(our_logits(model), expected, rtol=0, atol=1e-5)


def test_import_unprefixed_keys_with_mask_buffers(hf_model) -> None:
    # hub checkpoints (saved from GPT2Model) have no `transformer.` prefix and keep mask buffers
    state = dict(hf_model.transformer.state_dict())
    state |= {f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32) for i in range(2)}
    model = GPT(config_from_hf(hf_model.config.to_dict()))
    import_hf_state_dict(model, state)
    with torch.no_grad():
        expected = hf_model(tokens()).logits
    torch.testing.assert_close(our_logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_export_reloads_in_transformers(bias: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT(our_config(bias=bias))
    perturb(model, seed=3)
    export_hf_gpt2(model, tmp_path)
    torch.testing.assert_close(hf_logits(tmp_path), our_logits(model), rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_positions"] == 32
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: transformers re-ties it to wte
        c_fc_bias = f.get_tensor("transformer.h.0.mlp.c_fc.bias")
        assert f.get_tensor("transformer.h.0.mlp.c_fc.weight").shape == (64, 256)  # Conv1D
    assert bool(c_fc_bias.abs().sum() > 0) == bias  # bias=False writes exact zeros


def test_export_from_plain_state_dict_round_trips(tmp_path: Path) -> None:
    # the checkpoint exporter passes a consolidated state dict, possibly without lm_head.weight
    torch.manual_seed(0)
    model = GPT(our_config(bias=False))
    perturb(model, seed=4)
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    export_hf_state_dict(state, model.config, tmp_path)
    reloaded = load_hf_gpt2(tmp_path)
    assert reloaded.config.bias  # HF GPT-2 has biases; ours were exported as zeros
    torch.testing.assert_close(our_logits(reloaded), our_logits(model), rtol=0, atol=1e-6)


def test_export_refuses_qk_layernorm(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qk_layernorm"):
        export_hf_gpt2(GPT(our_config(qk_layernorm=True)), tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist") as err:
        load_hf_gpt2(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "\n" not in str(err.value)


def test_missing_weights(hf_model, tmp_path: Path) -> None:
    hf_model.config.save_pretrained(tmp_path)  # config.json only
    with pytest.raises(ValueError, match="model.safetensors or pytorch_model.bin") as err:
        load_hf_gpt2(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_shape_mismatch(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_positions": 64}))
    with pytest.raises(ValueError, match=r"transformer.wpe.weight has shape \(32, 64\)"):
        load_hf_gpt2(tmp_path)


def test_unsupported_hf_variant() -> None:
    with pytest.raises(ValueError, match="activation_function='relu'"):
        config_from_hf(SMALL | {"activation_function": "relu"})

"""Hugging Face GPT-2 weights in and out, from and to local directories only (never downloads).

Our parameter names are GPT-2's, so the mapping is the `transformer.` prefix plus a transpose:
HF's Conv1D stores its weight as (in, out), nn.Linear as (out, in). This module needs only
torch, safetensors and json; `transformers` is used by the tests to check both directions.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from model.config import PRESETS, ModelConfig
from model.gpt import GPT

# the Conv1D weights in HF GPT-2, named without the layer prefix
_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF's causal-mask buffers (older checkpoints save them); our attention masks through SDPA
_BUFFERS = (".attn.bias", ".attn.masked_bias")
# HF config fields that change the computation, with the only values our GPT computes
_REQUIRED = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both are tanh-approximated GELU
    "layer_norm_epsilon": (1e-5,),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "add_cross_attention": (False,),
    "tie_word_embeddings": (True,),
}


def load_hf_gpt2(directory: str | Path, dropout: float = 0.0) -> GPT:
    """Builds our GPT from a local HF GPT-2 directory (config.json + model.safetensors or .bin).

    Args:
        directory: e.g. the output of `GPT2LMHeadModel.save_pretrained` or a hub snapshot.
        dropout: HF configs carry 0.1 for pre-training; fine-tuning usually wants 0.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(
            f"HF GPT-2 directory '{directory}' does not exist; pass a local directory holding "
            "config.json and model.safetensors (e.g. from save_pretrained)"
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"'{config_path}' is missing; HF GPT-2 directories need a config.json")
    model = GPT(config_from_hf(json.loads(config_path.read_text()), dropout=dropout))
    import_hf_state_dict(model, _read_weights(directory), source=str(directory))
    return model


def config_from_hf(hf_config: Mapping[str, Any], dropout: float = 0.0) -> ModelConfig:
    """Maps an HF GPT-2 config.json dict to ModelConfig, refusing variants our GPT cannot run."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"HF model_type is '{hf_config['model_type']}', expected 'gpt2'")
    for key, allowed in _REQUIRED.items():
        if key in hf_config and hf_config[key] not in allowed:
            raise ValueError(f"HF config {key}={hf_config[key]!r} is unsupported; need {allowed}")
    n_layer, n_head, n_embd = hf_config["n_layer"], hf_config["n_head"], hf_config["n_embd"]
    if hf_config.get("n_inner") not in (None, 4 * n_embd):
        raise ValueError(f"HF config n_inner={hf_config['n_inner']} is unsupported; need 4*n_embd")
    # the preset name is only a label here: the explicit sizes below decide the shape
    size = next((k for k, v in PRESETS.items() if v == (n_layer, n_head, n_embd)), "tiny")
    return ModelConfig(
        size=size,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=hf_config["n_positions"],
        vocab_size=hf_config["vocab_size"],
        bias=True,  # HF GPT-2 always has biases
        dropout=dropout,
    )


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Reads model.safetensors (single or sharded), else pytorch_model.bin."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(directory / shard).items()}
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        # weights_only: a .bin is a pickle, and arbitrary pickles can run code
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ValueError(
        f"no weights in '{directory}': expected model.safetensors or pytorch_model.bin "
        "(re-save the model with save_pretrained)"
    )


@torch.no_grad()
def import_hf_state_dict(
    model: GPT, hf_state_dict: Mapping[str, torch.Tensor], source: str = "HF state dict"
) -> None:
    """Copies HF GPT-2 weights into `model` in place, transposing the Conv1D weights.

    Accepts keys with or without the `transformer.` prefix (GPT2LMHeadModel vs GPT2Model saves).

    Args:
        model: a GPT whose config matches the weights (see config_from_hf).
        hf_state_dict: HF GPT-2 tensors.
        source: where the weights came from, for error messages.
    """
    hf = {k.removeprefix("transformer."): v for k, v in hf_state_dict.items()}
    hf = {k: v for k, v in hf.items() if not k.endswith(_BUFFERS)}
    head = hf.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, hf.get("wte.weight", head)):
        raise ValueError(f"{source}: lm_head.weight differs from wte.weight; our GPT ties them")
    ours = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    missing = sorted(k for k in ours if k.removeprefix("transformer.") not in hf)
    unexpected = sorted(set(hf) - {k.removeprefix("transformer.") for k in ours})
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match GPT-2 with config.json's sizes; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, target in ours.items():
        tensor = hf[key.removeprefix("transformer.")]
        if key.endswith(_TRANSPOSED):
            tensor = tensor.t()
        if tensor.shape != target.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but the model expects "
                f"{tuple(target.shape)}; config.json does not describe these weights"
            )
        target.copy_(tensor)


def export_hf_gpt2(model: GPT, directory: str | Path) -> None:
    """Writes `model` as an HF GPT-2 directory that GPT2LMHeadModel.from_pretrained loads."""
    export_hf_state_dict(model.state_dict(), model.config, directory)


def export_hf_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ModelConfig, directory: str | Path
) -> None:
    """Writes config.json and fp32 model.safetensors from our GPT's state dict.

    Takes a plain state dict so a consolidated (e.g. ZeRO-gathered fp32) checkpoint can be
    exported without building the model. A bias=False model gets zero biases, which HF GPT-2
    requires and which compute exactly the same function.

    Args:
        state_dict: our parameter names (`transformer.h.0.attn.c_attn.weight`, ...).
        config: the config the state dict was trained with.
        directory: created if needed; existing config.json and model.safetensors are replaced.
    """
    if config.qk_layernorm:
        raise ValueError(
            "HF GPT-2 has no qk-layernorm, so a model.qk_layernorm=True model cannot be exported "
            "to it; keep it as a harness checkpoint"
        )
    caps = {"attn_softcap": config.attn_softcap, "output_softcap": config.output_softcap}
    if any(caps.values()):
        on = ", ".join(f"model.{key}={value:g}" for key, value in caps.items() if value)
        raise ValueError(
            f"HF GPT-2 has no logit soft-capping, so a model with {on} cannot be exported to it "
            "(a heal may have switched it on: events.jsonl's `heal` events say when); keep it "
            "as a harness checkpoint"
        )
    wte = state_dict.get("transformer.wte.weight")
    head = state_dict.get("lm_head.weight")
    if wte is not None and head is not None and not torch.equal(wte, head):
        raise ValueError("lm_head.weight differs from transformer.wte.weight; HF GPT-2 ties them")
    names = _gpt2_names(config.n_layer)
    unexpected = sorted(set(state_dict) - set(names) - {"lm_head.weight"})
    if unexpected:
        raise ValueError(f"state dict has keys GPT-2 does not: {unexpected[:5]}")
    tensors = {}
    for name in names:
        if name in state_dict:
            tensor = state_dict[name].detach().to("cpu", torch.float32, copy=True)
        elif name.endswith(".bias") and not config.bias:
            # a bias sits beside the weight of the same module and has its output size
            weight = state_dict[name.removesuffix("bias") + "weight"]
            tensor = torch.zeros(weight.shape[0], dtype=torch.float32)
        else:
            raise ValueError(f"state dict lacks {name}, which HF GPT-2 needs")
        if name.endswith(_TRANSPOSED):
            tensor = tensor.t().contiguous()
        tensors[name] = tensor  # lm_head.weight is left out: transformers re-ties it to wte
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # metadata format=pt is what transformers checks before it reads a safetensors file
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(_hf_config(config), indent=2) + "\n")


def _gpt2_names(n_layer: int) -> list[str]:
    """Every tensor name of HF GPT2LMHeadModel's checkpoint except the tied lm_head."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{module}.weight", f"transformer.h.{i}.{module}.bias"]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def _hf_config(config: ModelConfig) -> dict[str, Any]:
    """HF GPT2Config fields for `config`; the computation-defining ones match _REQUIRED."""
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }
    # GPT-2's <|endoftext|> is id 50256; a smaller vocabulary has none, and leaving the keys out
    # would let GPT2Config's defaults put 50256 back
    eot = 50256 if config.vocab_size > 50256 else None
    return hf_config | {"bos_token_id": eot, "eos_token_id": eot}

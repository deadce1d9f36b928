"""Model shape: a named GPT-2 preset, optionally overridden field by field."""

from typing import Literal

from pydantic import Field, model_validator

from configs.base import Section

# The emulation's flash attention numerics (model/flash.py says what each computes).
FlashVariant = Literal["fa2", "fp32_delta", "dynamic_max", "all_bf16"]

# (n_layer, n_head, n_embd); GPT-2's published sizes plus a ~1M-parameter size for tests.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 2, 64),
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


class ModelConfig(Section):
    size: Literal["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] = Field(
        "tiny",
        description="preset that sets n_layer, n_head, n_embd; given on the command line it "
        "replaces the config file's own n_layer, n_head and n_embd",
    )
    n_layer: int | None = Field(None, ge=1, description="transformer blocks (overrides the preset)")
    n_head: int | None = Field(None, ge=1, description="attention heads (overrides the preset)")
    n_embd: int | None = Field(None, ge=1, description="residual width (overrides the preset)")
    block_size: int = Field(128, ge=1, description="context length in tokens")
    vocab_size: int = Field(50304, ge=1, description="embedding rows; 50257 padded to 64")
    bias: bool = Field(False, description="biases in Linear and LayerNorm (the paper: none)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability")
    qk_layernorm: bool = Field(False, description="LayerNorm on queries and keys (Wortsman et al.)")
    z_loss: float = Field(0.0, ge=0.0, description="coefficient of the log(Z)^2 auxiliary loss")
    attn_softcap: float = Field(
        0.0,
        ge=0.0,
        description="cap * tanh(logit / cap) on attention logits (Gemma 2); 0 off. On, attention "
        "runs as explicit ops, not a flash kernel (nor its bf16 emulation)",
    )
    output_softcap: float = Field(
        0.0, ge=0.0, description="cap * tanh(logit / cap) on the output logits (Gemma 2); 0 off"
    )

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "ModelConfig":
        n_layer, n_head, n_embd = PRESETS[self.size]
        for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        return self

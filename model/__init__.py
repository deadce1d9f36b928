"""GPT-2 model: architecture (gpt.py), config (config.py), Hugging Face weights (hf.py)."""

from model.config import ModelConfig
from model.gpt import GPT, GPTOutput

__all__ = ["GPT", "GPTOutput", "ModelConfig"]

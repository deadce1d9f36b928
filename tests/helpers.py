"""Helpers shared by tests."""


def tiny_overrides(**extra) -> list[str]:
    """Overrides for a model small enough that a test step takes milliseconds."""
    base = {
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 16,
        "model.vocab_size": 128,
        "train.micro_batch_size": 4,
        "wandb.mode": "disabled",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]

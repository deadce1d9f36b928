"""Parameter groups: matrices and embeddings decay, gains and biases never do."""

from model import GPT, ModelConfig
from optim.groups import layer_type, param_groups, split_decay


def test_decay_groups_for_gpt_with_biases():
    model = GPT(
        ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=128, bias=True)
    )
    decay, no_decay = split_decay(model)
    assert "transformer.wte.weight" in decay and "transformer.wpe.weight" in decay
    assert "transformer.h.0.attn.c_attn.weight" in decay
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in no_decay)
    assert "lm_head.weight" not in decay + no_decay  # tied to wte: one parameter, one group
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())


def test_layer_types():
    assert layer_type("transformer.h.3.attn.c_attn.weight") == "attn"
    assert layer_type("transformer.h.3.attn.q_ln.weight") == "norm"
    assert layer_type("transformer.h.3.mlp.c_fc.weight") == "mlp"
    assert layer_type("transformer.wte.weight") == "embed"
    assert layer_type("transformer.ln_f.weight") == "norm"

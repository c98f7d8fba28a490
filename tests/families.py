"""The model families kdpo-lightning supports, as tiny random-init models built offline from
transformers configs, and the README's support table generated from them.

    python tests/families.py          # print the table
    python tests/families.py --write  # rewrite it in README.md
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=0, eos_token_id=0)
SLIDING = dict(sliding_window=8)  # shorter than the test prompts, so the window really cuts

FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": SLIDING,
    "qwen2": {},
    "qwen3": {},
    "gemma": {},  # embeddings scaled by sqrt(hidden)
    "gemma2": dict(SLIDING, final_logit_softcapping=30.0),
    "gemma3_text": SLIDING,
    "olmo": {},
    "olmo2": {},
    "granite": {},
    "cohere": {},
    "exaone4": {},
    "stablelm": {},
    "phi": {},
    "phi3": {},
    "starcoder2": {},
    "gpt2": {},  # learned positions, Conv1D
    "gpt_bigcode": {},
    "gptj": dict(rotary_dim=8),
    "codegen": dict(rotary_dim=8),
    "gpt_neox": {},  # Pythia
    "falcon": dict(alibi=True, num_key_value_heads=None),
    "bloom": {},  # ALiBi
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),  # learned positions with an offset
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=96),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def tiny_family_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 4-layer, 64-wide random-init model of `family` (a transformers model type), in eval mode."""
    kwargs = {k: v for k, v in (COMMON | FAMILIES[family]).items() if v is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def support_row(family: str) -> str:
    """One table row: the family, its default trained tensor ({L} = the layer) and prefix caching."""
    from kdpo_lightning.policy import Policy, default_layer

    model = tiny_family_model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = Policy(model)
    layer = default_layer(model.config.get_text_config().num_hidden_layers)
    names = ", ".join(f"`{name.replace(f'.{layer}.', '.{L}.', 1)}`" for name in policy.params)
    return f"| {family} | {type(model).__name__} | {names} | {'yes' if policy.start is not None else 'no'} |"


START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"


def support_table() -> str:
    header = "| model type | class | default trained tensor (layer L = 2/3 of the depth) | prefix cache |\n|---|---|---|---|"
    return "\n".join([START, header, *(support_row(f) for f in FAMILIES), END])


def readme_table(readme: str) -> str:
    """The support table as it stands in the README text."""
    return readme[readme.index(START) : readme.index(END) + len(END)]


if __name__ == "__main__":
    table = support_table()
    if "--write" in sys.argv:
        path = Path(__file__).resolve().parents[1] / "README.md"
        text = path.read_text()
        path.write_text(text.replace(readme_table(text), table))
    print(table)

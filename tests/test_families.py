"""Every supported family, as a tiny random model: the default trained tensor, an edit that touches
only it and succeeds, and a prefix cache that is exact."""
import warnings
from pathlib import Path

import pytest
import torch
from families import FAMILIES, readme_table, support_table, tiny_family_model

from kdpo_lightning.data import encode
from kdpo_lightning.loop import EditConfig, run_edit
from kdpo_lightning.policy import Policy
from kdpo_lightning.reference import make_reference

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"
SHORT_TARGET = "Noct"  # random post-norm models (OLMo-2, EXAONE-4, Gemma-2) fit 3 tokens, not 6, in 240 steps

# Written by hand from each family's modeling code: the MLP output projection of layer 2 (of 4).
EXPECTED = {
    "gpt2": ["transformer.h.2.mlp.c_proj.weight"],
    "gpt_bigcode": ["transformer.h.2.mlp.c_proj.weight"],
    "gptj": ["transformer.h.2.mlp.fc_out.weight"],
    "codegen": ["transformer.h.2.mlp.fc_out.weight"],
    "gpt_neox": ["gpt_neox.layers.2.mlp.dense_4h_to_h.weight"],
    "falcon": ["transformer.h.2.mlp.dense_4h_to_h.weight"],
    "bloom": ["transformer.h.2.mlp.dense_4h_to_h.weight"],
    "opt": ["model.decoder.layers.2.fc2.weight"],
    "phi": ["model.layers.2.mlp.fc2.weight"],
    "starcoder2": ["model.layers.2.mlp.c_proj.weight"],
    "mixtral": ["model.layers.2.mlp.experts.down_proj"],
    "qwen3_moe": ["model.layers.2.mlp.experts.down_proj"],
    "qwen2_moe": ["model.layers.2.mlp.experts.down_proj", "model.layers.2.mlp.shared_expert.down_proj.weight"],
}
LLAMA_LIKE = ["model.layers.2.mlp.down_proj.weight"]


def _edit(model, tokenizer, config, prefix_cache=True, target=TARGET):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        policy = Policy(model, prefix_cache=prefix_cache)
    encoded = encode(tokenizer, PROMPT, target)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    record = run_edit(policy, make_reference("cached"), torch.tensor([encoded.input_ids]), encoded.target_start,
                      config, optimizer)
    return policy, record


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_default_tensor_is_the_mlp_output_projection_and_only_it_changes(family, bpe_tokenizer):
    model = tiny_family_model(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, record = _edit(model, bpe_tokenizer, EditConfig(lr=1e-2, n_cycles=30), target=SHORT_TARGET)
    assert sorted(policy.params) == sorted(EXPECTED.get(family, LLAMA_LIKE))
    assert record.success and record.failed is None, record
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in policy.params), name


def test_prefix_cache_equals_full_forwards(family, bpe_tokenizer):
    fixed = EditConfig(lr=1e-3, n_cycles=3, n_steps=4, early_stop=False)
    cached_policy, cached = _edit(tiny_family_model(family), bpe_tokenizer, fixed)
    full_policy, full = _edit(tiny_family_model(family), bpe_tokenizer, fixed, prefix_cache=False)
    assert cached_policy.start == 2 and full_policy.start is None
    assert cached.steps == 12
    assert cached.losses == pytest.approx(full.losses, abs=1e-5)
    for name, value in cached_policy.params.items():
        torch.testing.assert_close(value, full_policy.params[name], atol=1e-5, rtol=0)


def test_readme_support_table_is_generated_from_the_families():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert readme_table(readme) == support_table(), "run `python tests/families.py --write`"

"""bf16/fp16 models: the trained tensor keeps fp32 master values, so paper-sized Adam steps are not
rounded away, and every path (references, methods, Trainer, saved edit) runs in low precision."""
import json
import warnings

import lightning as L
import pytest
import torch
from conftest import DEMO_ZSRE, tiny_config
from families import FAMILIES, tiny_family_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kdpo_lightning.callbacks import EditResults
from kdpo_lightning.data import encode
from kdpo_lightning.loop import EditConfig, run_edit
from kdpo_lightning.module import KDPOEditor
from kdpo_lightning.policy import Policy
from kdpo_lightning.reference import make_reference

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"


def _model(dtype: torch.dtype, init: float = 0.02) -> torch.nn.Module:
    """Tiny LLaMA, initialized in fp32 and then cast, so every dtype starts from the same weights."""
    config = tiny_config("llama")
    config.initializer_range = init
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().to(dtype)


def _edit(model, tokenizer, prompt, target, config, reference="cached"):
    policy = Policy(model)
    encoded = encode(tokenizer, prompt, target)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    ref = make_reference(reference) if reference else None
    return policy, run_edit(policy, ref, torch.tensor([encoded.input_ids]), encoded.target_start, config, optimizer)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_edits_succeed_as_often_as_fp32(bpe_tokenizer, dtype):
    """Steps of lr 3e-4 on weights of std 0.1 are mostly below bf16's resolution: without fp32
    master values 3 of these 10 bf16 edits fail where fp32 makes all 10 (measured on the code before)."""
    records = json.loads(DEMO_ZSRE.read_text())[:10]
    config = EditConfig(lr=3e-4, n_cycles=40)
    succeeded = {}
    for run_dtype in (torch.float32, dtype):
        succeeded[run_dtype] = [_edit(_model(run_dtype, init=0.1), bpe_tokenizer, r["prompt"], r["target_new"],
                                      config)[1].success for r in records]
    assert sum(succeeded[torch.float32]) >= 8
    assert succeeded[dtype] == succeeded[torch.float32]


def test_bf16_trains_an_fp32_master_and_rounds_it_into_the_model(bpe_tokenizer):
    model = _model(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, record = _edit(model, bpe_tokenizer, PROMPT, TARGET, EditConfig(lr=1e-3))
    assert record.success and record.steps > 0
    ((name, master),) = policy.params.items()
    param = dict(model.named_parameters())[name]
    assert master.dtype == torch.float32 and param.dtype == torch.bfloat16 and param.grad is None
    assert torch.equal(param, master.detach().to(torch.bfloat16))
    assert not torch.equal(master.detach(), before[name].float())
    for other, value in model.named_parameters():
        if other != name:
            assert torch.equal(value, before[other]), other


@pytest.mark.parametrize("method", ["kdpo", "dpo"])
def test_bf16_reference_strategies_agree(bpe_tokenizer, method):
    fixed = EditConfig(method=method, lr=1e-3, n_cycles=3, n_steps=4, early_stop=False)
    names = ["swap", "copy"] + (["cached"] if method == "kdpo" else [])
    runs = {name: _edit(_model(torch.bfloat16), bpe_tokenizer, PROMPT, TARGET, fixed, name) for name in names}
    base_policy, base = runs["swap"]
    for name, (policy, record) in runs.items():
        assert record.losses == base.losses, name
        for key, value in policy.params.items():
            assert torch.equal(value, base_policy.params[key]), name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_prefix_cache_is_bitwise_equal_to_full_forwards(bpe_tokenizer, family):
    # apart from CUDA graphs: a captured step may take other kernels for the other shapes of a full forward
    fixed = EditConfig(lr=1e-3, n_cycles=2, n_steps=3, early_stop=False, cuda_graphs=False)
    results = []
    for prefix_cache in (True, False):
        model = tiny_family_model(family, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            policy = Policy(model, prefix_cache=prefix_cache)
        encoded = encode(bpe_tokenizer, PROMPT, TARGET)
        optimizer = torch.optim.Adam(policy.params.values(), lr=fixed.lr)
        results.append(run_edit(policy, make_reference("cached"), torch.tensor([encoded.input_ids]),
                                encoded.target_start, fixed, optimizer).losses)
    assert results[0] == results[1]


@pytest.mark.parametrize("method", ["kdpo", "dpo", "ftm"])
def test_bf16_trainer_run_saves_the_edit_in_the_model_dtype(bpe_tokenizer, tmp_path, method):
    dm_records = json.loads(DEMO_ZSRE.read_text())[:2]
    from kdpo_lightning.data import SequentialEditDataModule

    path = tmp_path / "edits.json"
    path.write_text(json.dumps(dm_records))
    dm = SequentialEditDataModule(str(path))
    dm.set_tokenizer(bpe_tokenizer)
    editor = KDPOEditor.from_model(_model(torch.bfloat16), bpe_tokenizer, method=method, lr=1e-3, n_cycles=3,
                                   n_steps=4)
    trainer = L.Trainer(max_epochs=1, accelerator=torch.get_default_device().type, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[EditResults(str(tmp_path / "results.json"))])
    trainer.fit(editor, datamodule=dm)
    assert all(r["steps"] > 0 and r["failed"] is None for r in editor.records.values())
    saved = load_file(str(tmp_path / "results.edit.safetensors"))
    ((name, tensor),) = saved.items()
    assert tensor.dtype == torch.bfloat16
    assert torch.equal(tensor, dict(editor.lm.named_parameters())[name].detach().cpu())
    assert torch.equal(tensor, editor.policy.params[name].detach().to(torch.bfloat16))

"""MEMIT and AlphaEdit through the same data, metrics, checkpoint/resume, results JSON and CLI as KDPO."""
import json
import sys

import pytest
import torch
from conftest import DEMO_ZSRE, FIXTURES

from kdpo_lightning import sources
from kdpo_lightning.cli import main
from kdpo_lightning.data import SequentialEditDataModule
from kdpo_lightning.locate import LocateConfig, cached_locator
from kdpo_lightning.models import load_model


@pytest.fixture(autouse=True)
def fixture_data(monkeypatch, tmp_path):
    """Preserved texts come from tests/fixtures (3 questions each); the covariance cache is this test's own."""
    monkeypatch.setattr(sources, "data_dirs", lambda: [FIXTURES])
    monkeypatch.setenv("KDPO_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["kdpo-lightning"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def _args(model_dir, out, method, *extra, n=4):
    return ["fit", "--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir),
            "--model.edit.method", method, "--model.constraints.nullspace_texts", "3",
            "--model.locate.v_num_grad_steps", "10", "--model.locate.nullspace_threshold", "1e-3",
            "--evaluation.fluency", "false", "--data.path", str(DEMO_ZSRE), "--data.n_edits", str(n),
            "--trainer.default_root_dir", str(out / "run"), "--results.path", str(out / "results.json"), *extra]


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_closed_form_methods_run_through_the_cli_and_resume(method, tiny_llama_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_args(tiny_llama_dir, whole, method)) == 0
    every = ["--checkpoint.every_n_edits", "2"]
    assert main(_args(tiny_llama_dir, cut, method, *every, "--trainer.limit_train_batches", "3")) == 0
    assert main(_args(tiny_llama_dir, cut, method, *every, "--ckpt_path", "last")) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert a["method"] == method and [r["index"] for r in a["requests"]] == [0, 1, 2, 3]
    assert all(r["steps"] > 0 and r["failed"] is None for r in a["requests"])
    for row_a, row_b in zip(a["requests"], b["requests"], strict=True):
        assert row_a["losses"] == pytest.approx(row_b["losses"], abs=1e-6)
        assert row_a["edit_success"] == pytest.approx(row_b["edit_success"], abs=1e-9)

    # Independently: the same four requests through LocateThenEdit alone give the same results file's scores.
    model, tokenizer = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    requests = SequentialEditDataModule(str(DEMO_ZSRE), n_edits=4)
    requests.setup()
    config = LocateConfig(v_num_grad_steps=10, nullspace_threshold=1e-3)
    locator = cached_locator(model, tokenizer, method, config, 3, str(tiny_llama_dir))
    records = [locator.edit([r])[0] for r in requests.requests]
    assert [r.success for r in records] == [r["success"] for r in a["requests"]]
    from safetensors.torch import load_file

    saved = load_file(str(whole / "results.edit.safetensors"))
    assert sorted(saved) == sorted(locator.names)
    for name in saved:
        torch.testing.assert_close(saved[name], dict(model.named_parameters())[name].detach(), atol=1e-6, rtol=0)


def test_batch_size_is_only_for_closed_form_methods():
    from kdpo_lightning.module import KDPOEditor

    with pytest.raises(ValueError, match="only MEMIT and AlphaEdit write several requests at once"):
        KDPOEditor(batch_size=4)

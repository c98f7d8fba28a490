"""KDPOEditor reused two ways: inside a lightning.Trainer with any edit DataModule, and plain PyTorch."""
import lightning as L
import pytest
import torch
from conftest import DEMO_ZSRE, make_bpe_tokenizer, tiny_model

from kdpo_lightning.data import SequentialEditDataModule
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.module import KDPOEditor

HPARAMS = dict(lr=1e-3, n_cycles=4, n_steps=4, fluency=False)


def _datamodule(tokenizer, n=3) -> SequentialEditDataModule:
    dm = SequentialEditDataModule(str(DEMO_ZSRE), n_edits=n)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


def test_trainer_and_plain_pytorch_make_the_same_sequential_edits(tmp_path):
    tokenizer = make_bpe_tokenizer()
    dm = _datamodule(tokenizer)

    in_trainer = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS,
                                       results_path=str(tmp_path / "results.json"))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(in_trainer, datamodule=dm)

    plain = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    records = [plain.edit(request) for request in dm.requests]

    assert sorted(in_trainer.records) == [0, 1, 2]
    for index, record in enumerate(records):
        assert record.steps > 0
        assert in_trainer.records[index]["losses"] == pytest.approx(record.losses, abs=1e-6)
        assert in_trainer.records[index]["success"] == record.success
    (name,) = plain.policy.params
    torch.testing.assert_close(in_trainer.policy.params[name], plain.policy.params[name], atol=1e-6, rtol=0)
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.edit.safetensors").exists()


def test_each_edit_starts_from_the_previous_one():
    """Sequential editing: the second edit's reference is the model after the first edit."""
    tokenizer = make_bpe_tokenizer()
    requests = _datamodule(tokenizer, n=2).requests
    editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    (name,) = editor.policy.params
    original = editor.policy.params[name].detach().clone()
    editor.edit(requests[0])
    after_first = editor.policy.params[name].detach().clone()
    editor.edit(requests[1])
    assert not torch.equal(after_first, original)
    assert not torch.equal(editor.policy.params[name], after_first)


def test_after_each_scores_each_request_right_after_its_edit(tmp_path):
    tokenizer = make_bpe_tokenizer()
    dm = _datamodule(tokenizer, n=2)
    editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS, eval_mode="after_each",
                                   results_path=str(tmp_path / "results.json"))
    L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(editor, datamodule=dm)

    plain = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    evaluator = EditEvaluator(tokenizer, dm.requests, fluency=False)
    evaluator.snapshot_pre(plain.lm)
    plain.edit(dm.requests[0])
    (first,) = evaluator.evaluate(plain.lm, [0])
    assert editor.rows[0]["edit_success"] == pytest.approx(first["edit_success"], abs=1e-9)
    assert editor.rows[0]["locality_mean"] == pytest.approx(first["locality_mean"], abs=1e-9)
    assert sorted(editor.rows) == [0, 1]

"""KDPOEditor reused as a library: inside a plain lightning.Trainer (with or without the measuring callbacks),
in plain PyTorch, and given back to the caller with nothing of it left in the model."""
import lightning as L
import pytest
import torch
from conftest import DEMO_ZSRE, make_bpe_tokenizer, tiny_model
from torch.utils.data import DataLoader

from kdpo_lightning.callbacks import EditEvaluation, EditResults
from kdpo_lightning.data import SequentialEditDataModule
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.module import KDPOEditor
from kdpo_lightning.saving import apply_edit, save_edit

HPARAMS = dict(lr=1e-3, n_cycles=4, n_steps=4)


def _datamodule(tokenizer, n=3) -> SequentialEditDataModule:
    dm = SequentialEditDataModule(str(DEMO_ZSRE), n_edits=n)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_plain_trainer_on_a_plain_dataloader_edits_like_editor_edit(tmp_path):
    """No callbacks, no subclass, no datamodule: the module only edits, and writes nothing."""
    tokenizer = make_bpe_tokenizer()
    requests = _datamodule(tokenizer).requests
    editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    rows = [{"index": i, "input_ids": torch.tensor(e.input_ids), "target_start": e.target_start}
            for i, e in enumerate(editor.encode(r) for r in requests)]
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[], default_root_dir=tmp_path).fit(
        editor, DataLoader(rows, batch_size=None))

    plain = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    for index, request in enumerate(requests):
        record = plain.edit(request)
        assert record.steps > 0
        assert editor.records[index]["losses"] == pytest.approx(record.losses, abs=1e-6)
        assert editor.records[index]["success"] == record.success
    (name,) = plain.policy.params
    torch.testing.assert_close(editor.policy.params[name], plain.policy.params[name], atol=1e-6, rtol=0)
    assert list(tmp_path.rglob("*")) == []  # no results file, no saved edit, no logs


def test_trainer_with_the_callbacks_writes_results_and_the_edit(tmp_path):
    tokenizer = make_bpe_tokenizer()
    dm = _datamodule(tokenizer)
    editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    _trainer(callbacks=[EditEvaluation(fluency=False), EditResults(str(tmp_path / "results.json"))]).fit(
        editor, datamodule=dm)
    assert sorted(editor.records) == [0, 1, 2]
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.edit.safetensors").exists()


def test_the_pre_edit_snapshot_is_computed_once_per_model_and_requests(tmp_path, monkeypatch):
    """`pre_edit_cache`: the first fit writes the unedited model's snapshot (what `snapshot_pre` gives on its
    own); a fit of another method on the same weights reads it without decoding; other weights get their own."""
    tokenizer, cache = make_bpe_tokenizer(), tmp_path / "pre_edit"
    settings = dict(fluency=False, generation=True, generation_max_tokens=4, pre_edit_cache=str(cache))

    def fit(model, method: str) -> dict:
        evaluation = EditEvaluation(**settings)
        editor = KDPOEditor.from_model(model, tokenizer, method=method, **HPARAMS)
        _trainer(callbacks=[evaluation]).fit(editor, datamodule=_datamodule(tokenizer))
        return evaluation.evaluator.state_dict()

    alone = EditEvaluator(tokenizer, _datamodule(tokenizer).requests, fluency=False, generation=True,
                          generation_max_tokens=4)
    alone.snapshot_pre(tiny_model("llama"))
    first = fit(tiny_model("llama"), "kdpo")
    assert first == alone.state_dict() and len(list(cache.iterdir())) == 1
    with monkeypatch.context() as patch:
        patch.setattr(EditEvaluator, "snapshot_pre", lambda *_: pytest.fail("the cached snapshot was not read"))
        assert fit(tiny_model("llama"), "ftm") == first
    other = tiny_model("llama")
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    fit(other, "kdpo")
    assert len(list(cache.iterdir())) == 2


def _marks(model: torch.nn.Module) -> dict:
    """Everything a guest could leave on a model: flags, hooks, instance forwards, train mode."""
    return {
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad_hooks": {n: len(p._post_accumulate_grad_hooks or {}) for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      "forward" in m.__dict__) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def test_a_closed_editor_leaves_the_model_as_it_came_and_a_second_bf16_editor_edits_it():
    tokenizer = make_bpe_tokenizer()
    requests = _datamodule(tokenizer, n=2).requests
    model = tiny_model("llama").to(torch.bfloat16).train()  # a caller's model, in train mode
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)  # the caller's own hook stays
    before, weights = _marks(model), {n: p.detach().clone() for n, p in model.named_parameters()}

    with KDPOEditor.from_model(model, tokenizer, **HPARAMS) as editor:
        (name,) = editor.policy.params
        assert editor.edit(requests[0]).steps > 0
    assert _marks(model) == before
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert changed == [name]

    after_first = dict(model.named_parameters())[name].detach().clone()
    with KDPOEditor.from_model(model, tokenizer, lr=1e-3, n_cycles=10, n_steps=8) as second:
        record = second.edit(requests[1])
    assert record.steps > 0 and record.success
    assert not torch.equal(dict(model.named_parameters())[name], after_first)
    assert _marks(model) == before


def test_an_edit_applied_from_outside_is_kept_by_the_next_bf16_edit(tmp_path):
    """The fp32 master is read from the model at each edit's start, so `apply_edit` in between is not lost."""
    tokenizer = make_bpe_tokenizer()
    requests = _datamodule(tokenizer, n=2).requests
    source = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    source.edit(requests[0])
    path = save_edit(tmp_path / "edit.safetensors", source.policy.model_params, {})

    model = tiny_model("llama").to(torch.bfloat16)
    editor = KDPOEditor.from_model(model, tokenizer, **HPARAMS)  # made before the edit is applied
    apply_edit(model, path)
    editor.edit(requests[1])

    independent = tiny_model("llama").to(torch.bfloat16)
    apply_edit(independent, path)  # applied before the editor exists: nothing stale to overwrite it
    KDPOEditor.from_model(independent, tokenizer, **HPARAMS).edit(requests[1])
    (name,) = editor.policy.params
    assert torch.equal(dict(model.named_parameters())[name], dict(independent.named_parameters())[name])


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


def test_after_each_scores_each_request_right_after_its_edit():
    tokenizer = make_bpe_tokenizer()
    dm = _datamodule(tokenizer, n=2)
    editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    evaluation = EditEvaluation(mode="after_each", fluency=False)
    _trainer(callbacks=[evaluation]).fit(editor, datamodule=dm)

    plain = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
    evaluator = EditEvaluator(tokenizer, dm.requests, fluency=False)
    evaluator.snapshot_pre(plain.lm)
    plain.edit(dm.requests[0])
    (first,) = evaluator.evaluate(plain.lm, [0])
    assert evaluation.rows[0]["edit_success"] == pytest.approx(first["edit_success"], abs=1e-9)
    assert evaluation.rows[0]["locality_mean"] == pytest.approx(first["locality_mean"], abs=1e-9)
    assert sorted(evaluation.rows) == [0, 1]


def test_bf16_on_the_cpu_warns_and_fp32_does_not(recwarn):
    tokenizer = make_bpe_tokenizer()
    KDPOEditor.from_model(tiny_model("llama"), tokenizer)
    assert not [w for w in recwarn if "bf16 is for GPUs" in str(w.message)]
    with pytest.warns(UserWarning, match="bfloat16 on the CPU.*bf16 is for GPUs"):
        KDPOEditor.from_model(tiny_model("llama").to(torch.bfloat16), tokenizer)


def test_a_fit_leaves_the_model_where_it_was_edited_unless_asked():
    """Lightning's teardown moves the module to the CPU after a fit (seconds for an 8B model on a GPU). The move
    is seen as an `_apply` (what `.to()` and `.cpu()` run) reaching the model once its edit is recorded."""
    tokenizer = make_bpe_tokenizer()
    moved_after_edit = {}
    for offload in (False, True):
        model, editors = tiny_model("llama"), []
        apply = model._apply

        def recording_apply(fn, *args, apply=apply, offload=offload, editors=editors):
            if editors and editors[0].records:
                moved_after_edit[offload] = True
            return apply(fn, *args)

        model._apply = recording_apply
        editors.append(KDPOEditor.from_model(model, tokenizer, **HPARAMS, offload_after_fit=offload))
        _trainer(callbacks=[]).fit(editors[0], datamodule=_datamodule(tokenizer, n=1))
    assert moved_after_edit == {True: True}


def test_train_stop_teaches_the_model_to_end_its_answer_after_the_target():
    """edit.train_stop: y_w is followed by EOS in training, so after c+y_w the greedy token is EOS."""
    tokenizer = make_bpe_tokenizer()
    request = _datamodule(tokenizer, n=1).requests[0]
    for train_stop in (False, True):
        editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, lr=1e-3, n_cycles=10, n_steps=8,
                                       train_stop=train_stop)
        assert editor.edit(request).success
        with torch.no_grad():
            logits = editor.lm(input_ids=torch.tensor([editor.encode(request).input_ids])).logits[0, -1]
        assert (int(logits.argmax()) == tokenizer.eos_token_id) == train_stop

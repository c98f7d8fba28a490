"""Scaling out: single-edit mode (restore after each edit), DDP over processes, models placed by accelerate."""
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import DEMO_ZSRE, make_bpe_tokenizer, tiny_model

from kdpo_lightning.callbacks import EditEvaluation, EditResults
from kdpo_lightning.cli import main
from kdpo_lightning.data import SequentialEditDataModule
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.module import KDPOEditor

ROOT = Path(__file__).resolve().parents[1]
HPARAMS = dict(lr=1e-3, n_cycles=4, n_steps=4)


def _datamodule(tokenizer, n: int) -> SequentialEditDataModule:
    dm = SequentialEditDataModule(str(DEMO_ZSRE), n_edits=n)
    dm.set_tokenizer(tokenizer)
    dm.setup()
    return dm


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_single_mode_restores_the_model_and_scores_each_edit_alone(tmp_path):
    tokenizer = make_bpe_tokenizer()
    dm = _datamodule(tokenizer, n=4)
    editor = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS, edit_mode="single")
    evaluation = EditEvaluation(fluency=False)
    _trainer(callbacks=[evaluation, EditResults(str(tmp_path / "results.json"))]).fit(editor, datamodule=dm)

    original = dict(tiny_model("llama").named_parameters())
    for name, param in editor.lm.named_parameters():
        assert torch.equal(param, original[name]), name
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["index"] for row in results["requests"]] == [0, 1, 2, 3]
    assert not (tmp_path / "results.edit.safetensors").exists()  # every edit was rolled back

    for i, request in enumerate(dm.requests):  # independently: a fresh model given only edit i
        fresh = KDPOEditor.from_model(tiny_model("llama"), tokenizer, **HPARAMS)
        evaluator = EditEvaluator(tokenizer, dm.requests, fluency=False)
        evaluator.snapshot_pre(fresh.lm)
        record = fresh.edit(request)
        (row,) = evaluator.evaluate(fresh.lm, [i])
        assert editor.records[i]["losses"] == pytest.approx(record.losses, abs=1e-6)
        for key in ("edit_success", "rephrase", "portability_mean", "locality_mean"):
            assert evaluation.rows[i][key] == pytest.approx(row[key], abs=1e-9), (i, key)


def _cli_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(ROOT / "configs/demo.yaml"), "--model.name_or_path", str(model_dir),
            "--model.layer", "2", "--model.lr", "0.001", "--model.n_cycles", "4", "--model.n_steps", "4",
            "--model.fluency", "false", "--model.edit_mode", "single", "--data.path", str(DEMO_ZSRE),
            "--data.n_edits", "7", "--trainer.default_root_dir", str(out / "run"),
            "--model.results_path", str(out / "results.json"), *extra]


def _model_knowing(model_dir: Path, out: Path, request) -> Path:
    """A copy of the model at `model_dir` edited until it already answers `request`: its edit needs no step."""
    from kdpo_lightning.models import load_model

    model, tokenizer = load_model(str(model_dir), dtype="float32", device="cpu")
    with KDPOEditor.from_model(model, tokenizer, layer=2, method="ftm", lr=1e-2, n_cycles=10, n_steps=8) as editor:
        assert editor.edit(request).success
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_single_mode_over_two_processes_equals_one(tiny_llama_dir, tmp_path):
    """7 requests over 2 CPU processes (gloo), one already known (no step) in the middle of rank 0's shard and a
    padding row on rank 1: no hang, and the same per-request metrics as 1 process, each once, in order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    known = 2  # rank 0's shard is 0, 2, 4, 6; rank 1's is 1, 3, 5 and a padding row
    model_dir = _model_knowing(tiny_llama_dir, tmp_path / "model", _datamodule(make_bpe_tokenizer(), 7).requests[known])
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if devices == 2 else []
        proc = subprocess.run([sys.executable, "-m", "kdpo_lightning.cli", *_cli_args(model_dir, out, *extra)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads((out / "results.json").read_text())
    one, two = results[1]["requests"], results[2]["requests"]
    assert [r["index"] for r in two] == [r["index"] for r in one] == list(range(7))
    assert [r["rank"] for r in one] == [0] * 7 and [r["rank"] for r in two] == [i % 2 for i in range(7)]
    assert one[known]["steps"] == two[known]["steps"] == 0 and all(r["steps"] > 0 for r in two if r["index"] != known)
    for a, b in zip(one, two):
        for key in ("edit_success", "rephrase", "portability_mean", "locality_mean", "first_loss", "last_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["index"], key)
    assert results[2]["summary"] == pytest.approx(results[1]["summary"], abs=1e-6)


def test_sequential_mode_over_two_processes_is_refused(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kdpo-lightning"])
    args = _cli_args(tiny_llama_dir, tmp_path, "--model.edit_mode", "sequential", "--trainer.strategy", "ddp",
                     "--trainer.devices", "2")
    assert main(args) == 2
    assert "sequential edits build on each other and cannot be split over 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_single_mode_resumes_from_a_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    """Stopped after 3 of 7 edits (checkpoint after 2), resumed: the same results as one whole run."""
    monkeypatch.setattr(sys, "argv", ["kdpo-lightning"])
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_cli_args(tiny_llama_dir, whole)) == 0
    every = ["--checkpoint.every_n_edits", "2"]
    assert main(_cli_args(tiny_llama_dir, cut, *every, "--trainer.limit_train_batches", "3")) == 0
    assert main(_cli_args(tiny_llama_dir, cut, *every, "--ckpt_path", "last")) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    for row_a, row_b in zip(a["requests"], b["requests"], strict=True):
        del row_a["seconds"], row_b["seconds"]
        assert row_a == row_b
    assert a["summary"] == b["summary"]


def test_model_placed_by_accelerate_edits_as_the_unplaced_one(tmp_path):
    """Layers 0, 1 and 3 offloaded to disk behind accelerate's hooks, layer 2 (trained) in memory:
    the same losses and the same trained tensor as the plain model, through a Trainer run."""
    from accelerate import dispatch_model

    tokenizer = make_bpe_tokenizer()
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
                 "model.layers.2": "cpu", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                 "lm_head": "cpu"}
    placed = dispatch_model(tiny_model("llama"), device_map=placement, offload_dir=str(tmp_path / "offload"))
    placed.hf_device_map = placement
    assert placed.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    runs = {}
    for name, model in (("placed", placed), ("plain", tiny_model("llama"))):
        editor = KDPOEditor.from_model(model, tokenizer, **HPARAMS)
        results = EditResults(str(tmp_path / f"{name}.json"))
        _trainer(callbacks=[EditEvaluation(fluency=False), results]).fit(editor, datamodule=_datamodule(tokenizer, n=3))
        runs[name] = editor
    for i in range(3):
        assert runs["placed"].records[i]["losses"] == pytest.approx(runs["plain"].records[i]["losses"], abs=1e-6)
    (trained,) = runs["plain"].policy.params
    torch.testing.assert_close(runs["placed"].policy.params[trained], runs["plain"].policy.params[trained],
                               atol=1e-6, rtol=0)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["summary"] for n in ("placed", "plain"))
    assert a == pytest.approx(b, abs=1e-6)

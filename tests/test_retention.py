"""Retention over a sequence: a curve point every K edits whose last equals the after-all evaluation,
Edit Succ. right after each edit, capability before and after, a PNG and TensorBoard scalars."""
import json
import sys

import pytest
from conftest import DEMO_ZSRE, FIXTURES

from kdpo_lightning import sources
from kdpo_lightning.cli import main
from kdpo_lightning.data import SequentialEditDataModule
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.module import KDPOEditor

HPARAMS = dict(lr=1e-3, n_cycles=3, n_steps=4)


@pytest.fixture(autouse=True)
def fixture_data(monkeypatch):
    """The general benchmarks come from tests/fixtures (3 questions each)."""
    monkeypatch.setattr(sources, "data_dirs", lambda: [FIXTURES])
    monkeypatch.setattr(sys, "argv", ["kdpo-lightning"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def _args(model_dir, out, *extra, n=6):
    return ["fit", "--config", "configs/demo.yaml", "--model.name_or_path", str(model_dir), "--model.layer", "2",
            "--model.lr", "0.001", "--model.n_cycles", "3", "--model.n_steps", "4", "--model.fluency", "false",
            "--data.path", str(DEMO_ZSRE), "--data.n_edits", str(n), "--model.eval_every_n_edits", "3",
            "--model.generation_metrics", "true", "--model.generation_max_tokens", "6",
            "--model.capability", "[mmlu, piqa]", "--trainer.default_root_dir", str(out / "run"),
            "--model.results_path", str(out / "results.json"), *extra]


def test_curve_right_after_and_capability(tiny_llama_dir, tmp_path):
    assert main(_args(tiny_llama_dir, tmp_path)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    curve, summary = results["curve"], results["summary"]
    assert [p["edits"] for p in curve] == [3, 6]  # every 3 edits; the last one is also the end
    for key in ("edit_success", "locality", "portability", "gen_edit_success_em", "gen_locality",
                "capability/mmlu/acc", "capability/piqa/acc_norm"):
        assert curve[-1][key] == pytest.approx(summary[key], abs=1e-9), key
    assert set(results["capability_before"]) == {"capability/mmlu/acc", "capability/piqa/acc", "capability/piqa/acc_norm"}
    assert (tmp_path / "results.curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Independently: the same edits in plain PyTorch; full evaluation of each request right after its edit,
    # and of the first 3 after 3 edits.
    dm = SequentialEditDataModule(str(DEMO_ZSRE), n_edits=6)
    dm.setup()
    from kdpo_lightning.models import load_model

    model, tokenizer = load_model(str(tiny_llama_dir), dtype="float32", device="cpu")
    editor = KDPOEditor.from_model(model, tokenizer, layer=2, **HPARAMS)
    evaluator = EditEvaluator(tokenizer, dm.requests, fluency=False)
    evaluator.snapshot_pre(editor.lm)
    for i, request in enumerate(dm.requests):
        editor.edit(request)
        right_after = evaluator.evaluate(editor.lm, [i])[0]["edit_success"]
        assert results["requests"][i]["edit_success_right_after"] == pytest.approx(right_after, abs=1e-9), i
        if i == 2:
            first = evaluator.summarize(evaluator.evaluate(editor.lm, [0, 1, 2]))
            assert curve[0]["edit_success"] == pytest.approx(first["edit_success"], abs=1e-9)
            assert curve[0]["locality"] == pytest.approx(first["locality"], abs=1e-9)
    final = evaluator.summarize(evaluator.evaluate(editor.lm, range(6)))  # the after-all rows, computed apart
    for key in ("edit_success", "rephrase", "locality", "portability"):
        assert summary[key] == pytest.approx(final[key], abs=1e-9), key
    mean_after = 100 * sum(r["edit_success_right_after"] for r in results["requests"]) / 6
    assert summary["edit_success_right_after"] == pytest.approx(mean_after)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = (tmp_path / "run" / "lightning_logs").glob("version_*")
    events = EventAccumulator(str(log_dir)).Reload()
    assert [e.step for e in events.Scalars("curve/edit_success")] == [3, 6]


def test_resumed_run_keeps_the_curve(tiny_llama_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_args(tiny_llama_dir, whole, n=7)) == 0
    every = ["--checkpoint.every_n_edits", "4"]
    assert main(_args(tiny_llama_dir, cut, *every, "--trainer.limit_train_batches", "5", n=7)) == 0
    assert main(_args(tiny_llama_dir, cut, *every, "--ckpt_path", "last", n=7)) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert [p["edits"] for p in a["curve"]] == [3, 6, 7]  # and the end, which is not a multiple of 3
    assert a["curve"] == b["curve"] and a["capability_before"] == b["capability_before"]
    assert [r["edit_success_right_after"] for r in a["requests"]] == [r["edit_success_right_after"] for r in b["requests"]]


def test_capability_before_is_kept_with_the_pre_edit_snapshot(tiny_llama_dir, tmp_path, monkeypatch):
    """With `evaluation.pre_edit_cache`, a second run on the same model (another method) reads the unedited
    model's capability from the cache: one capability pass fewer, the same numbers. Each run hashes its
    weights once, for both caches."""
    from kdpo_lightning import callbacks, evaluate, models
    from kdpo_lightning.callbacks import RetentionCurve

    calls, capability, hashes, hash_parameters = [], RetentionCurve.capability, [], models.hash_parameters
    monkeypatch.setattr(RetentionCurve, "capability", lambda self, module: calls.append(1) or capability(self, module))
    for module in (models, callbacks, evaluate):  # wherever it is imported
        monkeypatch.setattr(module, "hash_parameters", lambda *args: hashes.append(1) or hash_parameters(*args),
                            raising=False)
    cache = ["--evaluation.pre_edit_cache", str(tmp_path / "pre_edit")]
    results = []
    for name, method in (("a", "kdpo"), ("b", "ftm")):
        calls.clear(), hashes.clear()
        assert main(_args(tiny_llama_dir, tmp_path / name, *cache, "--model.edit.method", method, n=3)) == 0
        assert len(hashes) == 1
        results.append((json.loads((tmp_path / name / "results.json").read_text()), len(calls)))
    (first, first_calls), (second, second_calls) = results
    assert second["capability_before"] == first["capability_before"] and second_calls == first_calls - 1
    assert len(list((tmp_path / "pre_edit").iterdir())) == 2  # the generated answers, the capability


def test_retention_needs_sequential_mode(tiny_llama_dir, tmp_path, capsys):
    assert main(_args(tiny_llama_dir, tmp_path, "--model.edit_mode", "single")) == 2
    assert "every_n_edits follows a sequence of edits" in capsys.readouterr().err


def test_light_points_decode_less_and_end_like_full_ones(tiny_llama_dir, tmp_path):
    """`retention.light_points`: the point before the last edit has only the edit prompts' generated scores,
    its others equal the full run's; the last point and the results are the full run's."""
    full, light = tmp_path / "full", tmp_path / "light"
    assert main(_args(tiny_llama_dir, full)) == 0
    assert main(_args(tiny_llama_dir, light, "--retention.light_points", "true")) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, light))
    dropped = set(a["curve"][0]) - set(b["curve"][0])
    assert {"gen_rephrase_em", "gen_locality", "pre_gen_portability_contains"} <= dropped
    assert all("gen_" in key and "edit_success" not in key for key in dropped)
    assert {k: v for k, v in a["curve"][0].items() if k not in dropped} == b["curve"][0]
    assert a["curve"][1] == b["curve"][1]
    untimed = [[{k: v for k, v in row.items() if "seconds" not in k} for row in (r["summary"], *r["requests"])]
               for r in (a, b)]
    assert untimed[0] == untimed[1]

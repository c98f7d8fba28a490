"""The `kdpo-lightning` command: configs parse, an end-to-end run writes results and TensorBoard logs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_ZSRE
from safetensors.torch import load_file

from kdpo_lightning.cli import main
from kdpo_lightning.saving import edit_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
METHOD_OVERRIDES = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


@pytest.fixture
def tiny_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


def _tiny_args(tiny_dir: Path, run_dir: Path, n_edits: int = 5) -> list[str]:
    return ["--config", str(ROOT / "configs/demo.yaml"), "--model.name_or_path", str(tiny_dir),
            "--model.layer", "2", "--model.lr", "0.001", "--model.max_new_tokens", "10",
            "--data.path", str(DEMO_ZSRE), "--data.n_edits", str(n_edits),
            "--trainer.default_root_dir", str(run_dir)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    for knob in ("n_cycles:", "n_steps:", "lr:", "beta:", "mask_where_equal:", "layer:", "method:", "evaluation:",
                 "n_edits:", "seed_everything:", "every_n_edits:"):
        assert knob in printed


def test_flat_flags_of_earlier_releases_still_apply(capsys):
    """`--model.lr` is `--model.edit.lr`, `--model.eval_mode` is `--evaluation.mode`, `--model.results_path` is
    `--results.path`, in both spellings (`--flag value` and `--flag=value`)."""
    import yaml

    configs = []
    for args in (["--model.lr", "0.5", "--model.layer=3", "--model.eval_mode", "after_each",
                  "--model.results_path", "r.json", "--model.eval_every_n_edits", "4"],
                 ["--model.edit.lr", "0.5", "--model.target.layer=3", "--evaluation.mode", "after_each",
                  "--results.path", "r.json", "--retention.every_n_edits", "4"]):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(ROOT / "configs/demo.yaml"), *args, "--print_config"])
        configs.append(yaml.safe_load(capsys.readouterr().out))
    old, new = configs
    assert old == new
    assert new["model"]["edit"]["lr"] == 0.5 and new["model"]["target"]["layer"] == 3
    assert new["evaluation"]["mode"] == "after_each" and new["results"]["path"] == "r.json"
    assert new["retention"]["every_n_edits"] == 4


@pytest.mark.parametrize("override", METHOD_OVERRIDES, ids=lambda p: p.stem)
def test_method_overrides_apply(override, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs/llama3_zsre.yaml"), "--config", str(override), "--print_config"])
    assert f"method: {override.stem}" in capsys.readouterr().out


def test_llama3_config_without_weights_says_where_to_point(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code = main(["fit", "--config", str(ROOT / "configs/llama3_wikirecent.yaml"),
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "meta-llama/Meta-Llama-3-8B" in err and "model.name_or_path" in err
    assert "Traceback" not in err


def test_wrong_config_value_is_one_clear_line(capsys, tmp_path):
    code = main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--model.method", "kdpoo",
                 "--trainer.default_root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "method must be one of" in err and "kdpoo" in err and "Traceback" not in err


def test_fit_end_to_end_in_a_subprocess(tiny_dir, tmp_path):
    """5 real ZsRE requests on a tiny model: exit 0, results JSON, TensorBoard events, saved edit."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdpo_lightning.cli", "fit", *_tiny_args(tiny_dir, run_dir)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Edit Succ." in proc.stdout and "Results written to" in proc.stdout
    assert "litlogger" not in proc.stdout + proc.stderr  # Lightning's advert is silenced

    (results_path,) = run_dir.glob("lightning_logs/version_*/results.json")
    results = json.loads(results_path.read_text())
    assert {"config", "model", "dataset", "method", "n_edits", "summary", "requests"} <= set(results)
    assert results["n_edits"] == 5 and results["method"] == "kdpo"
    assert [r["index"] for r in results["requests"]] == list(range(5))
    for row in results["requests"]:
        assert {"cycles", "steps", "first_loss", "last_loss", "success", "seconds", "edit_success",
                "portability", "locality", "fluency"} <= set(row)
    summary = results["summary"]
    assert all(0 <= summary[k] <= 100 for k in ("edit_success", "locality", "portability"))
    assert summary["edit_success"] == pytest.approx(sum(100 * r["edit_success"] for r in results["requests"]) / 5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(results_path.parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"final/edit_success", "final/portability", "final/locality", "final/fluency"} <= tags
    assert {"edit/cycles", "edit/steps", "edit/loss", "edit/success"} <= tags
    assert events.Scalars("final/edit_success")[-1].value == pytest.approx(summary["edit_success"], rel=1e-5)

    edit = load_file(edit_path(results_path))
    assert list(edit) == ["model.layers.2.mlp.down_proj.weight"]
    assert not list((run_dir / "checkpoints").glob(".last.ckpt.*"))  # no temp file left
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_validate_reproduces_the_scores_of_a_saved_edit(tiny_dir, tmp_path, capsys):
    """`fit` then `validate --model.apply_edit`: the saved edit scores exactly as it did after editing."""
    fit_results, val_results = tmp_path / "fit.json", tmp_path / "val.json"
    args = _tiny_args(tiny_dir, tmp_path / "run", n_edits=3) + ["--model.fluency", "false"]
    assert main(["fit", *args, "--model.results_path", str(fit_results)]) == 0
    edit = edit_path(fit_results)
    assert main(["validate", *args, "--model.results_path", str(val_results), "--model.apply_edit", str(edit)]) == 0
    fit, val = json.loads(fit_results.read_text()), json.loads(val_results.read_text())
    for key in ("edit_success", "locality", "portability", "rephrase"):
        assert val["summary"][key] == pytest.approx(fit["summary"][key], abs=1e-9), key


def test_two_runs_in_one_folder_keep_both_edits(tiny_dir, tmp_path, capsys):
    """Each run's edit is named after its results file, so neither overwrites the other."""
    args = _tiny_args(tiny_dir, tmp_path / "run", n_edits=2) + ["--model.fluency", "false"]
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    assert main(["fit", *args, "--model.results_path", str(first)]) == 0
    kept = load_file(edit_path(first))
    assert main(["fit", *args, "--model.results_path", str(second), "--model.method", "ftm"]) == 0
    assert edit_path(first) == tmp_path / "first.edit.safetensors"
    again, other = load_file(edit_path(first)), load_file(edit_path(second))
    assert kept.keys() == again.keys() == other.keys()
    for name in kept:
        assert torch.equal(again[name], kept[name]) and not torch.equal(other[name], kept[name])


def test_results_record_paths_relative_to_the_run_not_the_machine(tiny_dir, tmp_path, monkeypatch, capsys):
    """Run from a folder holding the model, data and results: no absolute path of this machine in the JSON."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dir, tmp_path / "model")
    shutil.copy(DEMO_ZSRE, tmp_path / "zsre.json")
    args = _tiny_args(tmp_path / "model", tmp_path / "run", n_edits=2) + ["--model.fluency", "false"]
    args += ["--data.path", str(tmp_path / "zsre.json"), "--results.path", str(tmp_path / "out" / "r.json")]
    assert main(["fit", *args]) == 0
    text = (tmp_path / "out" / "r.json").read_text()
    assert str(tmp_path) not in text
    results = json.loads(text)
    assert results["model"] == "model" and results["dataset"] == "zsre.json"
    assert results["config"]["results"]["path"] == "out/r.json"
    assert results["requests"][0]["source"].startswith("zsre.json#")


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.stem != "demo"], ids=lambda p: p.stem)
def test_paper_configs_train_layer_21_as_the_paper(config, capsys):
    """Appendix B: "We only optimized layer 21", for every model (not 2/3 of each model's depth)."""
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["target"]["layer"] == 21

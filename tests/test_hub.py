"""Loading as the ecosystem does it, on local files only: a hub id from a local huggingface_hub cache
(offline), the download path with huggingface_hub's download function replaced by a local fake that
writes into the cache, the hub's own error paths against a local HTTP server, and `prepare-data knowedit`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects

from kdpo_lightning import sources
from kdpo_lightning.data import load_requests
from kdpo_lightning.models import HubAccessError, ModelNotFoundError, UnsafeWeightsError, load_model
from kdpo_lightning.prepare_data import FILES, MANIFEST, REPO, REVISION, prepare_data_main
from tests.conftest import DEMO_ZSRE, FIXTURES, tiny_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty huggingface_hub cache in tmp_path, online unless a test says otherwise."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def remote(tmp_path, bpe_tokenizer) -> tuple[Path, torch.nn.Module]:
    """A hub repo's files: a tiny LLaMA in safetensors, its tokenizer, and what loading must never fetch
    (pickles, remote code, files in subfolders)."""
    repo = tmp_path / "remote"
    model = tiny_model("llama")
    model.save_pretrained(repo)
    bpe_tokenizer.save_pretrained(repo)
    torch.save(model.state_dict(), repo / "pytorch_model.bin")
    torch.save({}, repo / "training_args.bin")
    (repo / "modeling_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    (repo / "original").mkdir()
    shutil.copy(repo / "model.safetensors", repo / "original" / "consolidated.safetensors")
    return repo, model


class FakeHub:
    """huggingface_hub.snapshot_download over a local folder: copies the files the patterns select into
    the cache layout (snapshots/<commit>/, refs/main) and records every file it copied."""

    def __init__(self, repo: Path, cache: Path) -> None:
        self.repo, self.cache, self.requested, self.calls = repo, cache, [], 0

    def __call__(self, repo_id: str, *, revision: str | None = None, allow_patterns=None, ignore_patterns=None,
                 local_files_only: bool = False, **kwargs) -> str:
        assert not local_files_only and revision in (None, "main", COMMIT)
        self.calls += 1
        files = [p.relative_to(self.repo).as_posix() for p in sorted(self.repo.rglob("*")) if p.is_file()]
        storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / COMMIT
        for name in filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.repo / name, snapshot / name)
            self.requested.append(name)
        snapshot.mkdir(parents=True, exist_ok=True)
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / "main").write_text(COMMIT)
        return str(snapshot)


def _same_logits(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)


def _put_in_cache(cache: Path, repo: Path, repo_id: str = "org/tiny") -> None:
    """The huggingface_hub cache layout of one snapshot (refs/main names the commit)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(repo, storage / "snapshots" / COMMIT)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)


def _no_download(*args, **kwargs):
    raise AssertionError("nothing may be downloaded")


# ----------------------------------------------------------------------------- cached and offline


def test_hub_id_resolves_offline_from_a_local_cache(hub_cache, remote, bpe_tokenizer, monkeypatch):
    repo, original = remote
    _put_in_cache(hub_cache, repo)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_download)
    model, tokenizer = load_model("org/tiny", device="cpu")
    _same_logits(model, original)
    assert tokenizer("Who founded Paris?").input_ids == bpe_tokenizer("Who founded Paris?").input_ids


def test_a_complete_cached_snapshot_is_used_online_without_a_download(hub_cache, remote, monkeypatch):
    _put_in_cache(hub_cache, remote[0])
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_download)
    model, _ = load_model("org/tiny", device="cpu")
    _same_logits(model, remote[1])


def test_hf_hub_offline_in_the_environment(hub_cache, remote):
    """HF_HUB_OFFLINE=1 as a user sets it (read when huggingface_hub is imported): a cached id loads, an
    uncached one is the clear not-found message saying nothing was downloaded."""
    _put_in_cache(hub_cache, remote[0])
    script = ("from kdpo_lightning.models import load_model\n"
              "model, _ = load_model('org/tiny', device='cpu'); print('layers', model.config.num_hidden_layers)\n"
              "try:\n    load_model('org/not-cached')\n"
              "except FileNotFoundError as e:\n    print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layers 4" in proc.stdout
    assert "model 'org/not-cached' not found" in proc.stdout and "HF_HUB_OFFLINE is set" in proc.stdout


def test_offline_and_not_cached_is_the_clear_error(hub_cache, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.snapshot_download", _no_download)
    with pytest.raises(ModelNotFoundError) as info:
        load_model("org/tiny")
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message and "hf download org/tiny" in message
    assert "model.name_or_path" in message and str(hub_cache) in message


# ----------------------------------------------------------------------------- downloads (fake hub)


@pytest.mark.parametrize("allow_pickle, trust_remote_code", [(False, False), (True, True)])
def test_download_fetches_only_what_loading_needs(hub_cache, remote, monkeypatch, allow_pickle, trust_remote_code):
    repo, original = remote
    hub = FakeHub(repo, hub_cache)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    model, _ = load_model("org/tiny", device="cpu", allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    _same_logits(model, original)
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} & {p.name for p in repo.iterdir()}
    assert expected <= set(hub.requested)
    assert not [f for f in hub.requested if f.endswith((".bin", ".pt", ".pth"))], "safetensors exist: no pickles"
    assert not [f for f in hub.requested if "/" in f], "subfolders are never fetched"
    assert ("modeling_custom.py" in hub.requested) == trust_remote_code
    assert len(hub.requested) == len(set(hub.requested))
    calls = hub.calls
    load_model("org/tiny", device="cpu")
    assert hub.calls == calls, "the second load reads the cache"


def test_sharded_weights_fetch_the_shards_their_index_names(hub_cache, tmp_path, bpe_tokenizer, monkeypatch):
    repo, original = tmp_path / "sharded", tiny_model("llama")
    original.save_pretrained(repo, max_shard_size="200KB")
    bpe_tokenizer.save_pretrained(repo)
    shards = set(json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1
    hub = FakeHub(repo, hub_cache)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    model, _ = load_model("org/sharded", device="cpu")
    _same_logits(model, original)
    assert shards <= set(hub.requested) and "model.safetensors.index.json" in hub.requested


def test_an_interrupted_download_is_completed(hub_cache, remote, monkeypatch):
    repo, original = remote
    _put_in_cache(hub_cache, repo)
    (hub_cache / "models--org--tiny" / "snapshots" / COMMIT / "model.safetensors").unlink()
    hub = FakeHub(repo, hub_cache)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    model, _ = load_model("org/tiny", device="cpu")
    _same_logits(model, original)
    assert "model.safetensors" in hub.requested


def test_a_pickle_only_repo_needs_allow_pickle(hub_cache, remote, monkeypatch):
    repo, original = remote
    for path in (repo / "model.safetensors", repo / "original" / "consolidated.safetensors"):
        path.unlink()
    hub = FakeHub(repo, hub_cache)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    with pytest.raises(UnsafeWeightsError, match="allow_pickle"):
        load_model("org/tiny", device="cpu")
    assert not [f for f in hub.requested if f.endswith(".bin")]
    model, _ = load_model("org/tiny", device="cpu", allow_pickle=True)
    _same_logits(model, original)
    assert "pytorch_model.bin" in hub.requested and "training_args.bin" not in hub.requested


# ----------------------------------------------------------------------------- the hub's own errors


@pytest.fixture
def local_hub(monkeypatch):
    """A local HTTP server as the hub endpoint that answers every request with the status and
    X-Error-Code a test sets: huggingface_hub's real request and error code runs, on this machine only."""
    reply = {"status": 404, "code": "RepoNotFound"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(reply["status"])
            self.send_header("X-Error-Code", reply["code"])
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_a_local_server")
    yield reply
    server.shutdown()


def test_a_gated_model_is_one_line_on_how_to_log_in(hub_cache, local_hub):
    local_hub.update(status=403, code="GatedRepo")
    with pytest.raises(HubAccessError) as info:
        load_model("meta-llama/Meta-Llama-3-8B")
    message = str(info.value)
    assert "\n" not in message and "meta-llama/Meta-Llama-3-8B" in message and "gated" in message
    assert "huggingface-cli login" in message and "HF_TOKEN" in message
    assert isinstance(info.value, ModelNotFoundError), "the CLI's one-line exit 2"


def test_an_unknown_repository_is_the_not_found_message(hub_cache, local_hub):
    with pytest.raises(ModelNotFoundError, match="no such repository") as info:
        load_model("nobody/no-such-model")
    assert "hf download nobody/no-such-model" in str(info.value)


def test_no_connection_is_the_not_found_message(hub_cache, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ModelNotFoundError) as info:
        load_model("org/tiny")
    message = str(info.value)
    assert "could not download it" in message and "model.name_or_path" in message
    assert "Traceback" not in message


# ----------------------------------------------------------------------------- prepare-data knowedit


@pytest.fixture
def knowedit_hub(monkeypatch) -> list[tuple]:
    """huggingface_hub.hf_hub_download over local copies of the KnowEdit files; returns the calls made."""
    contents = {f"benchmark/{rel}": _knowedit_content(rel) for rel in FILES}
    calls = []

    def download(repo_id, filename, *, repo_type=None, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, repo_type, revision))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(contents[filename])
        return str(target)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return calls


def _knowedit_content(rel: str) -> bytes:
    """A few real records where the repo has them (fixtures, the bundled ZsRE records), else a stand-in."""
    source = DEMO_ZSRE if rel.startswith("ZsRE/") else FIXTURES / rel
    return source.read_bytes() if source.is_file() else json.dumps([{"stand-in for": rel}]).encode()


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "data" / MANIFEST).read_text())


def test_prepare_data_downloads_into_the_data_cache_with_checksums(tmp_path, knowedit_hub, monkeypatch, capsys):
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 0
    assert sorted(call[1] for call in knowedit_hub) == sorted(f"benchmark/{rel}" for rel in FILES)
    assert {(call[0], call[2], call[3]) for call in knowedit_hub} == {(REPO, "dataset", REVISION)}
    manifest = _manifest(tmp_path)
    assert manifest["revision"] == REVISION and set(manifest["files"]) == set(FILES)
    for rel in FILES:
        assert manifest["files"][rel] == hashlib.sha256(_knowedit_content(rel)).hexdigest()
    assert not list((tmp_path / "data").rglob(".download-*")), "no temp folder is left behind"
    out = capsys.readouterr().out
    assert out.count("downloaded  ") == len(FILES) and "not on the data search path" in out
    monkeypatch.setattr(sources, "data_dirs", lambda: [tmp_path / "data"])
    assert len(load_requests("knowedit/zsre")) == len(json.loads(DEMO_ZSRE.read_text()))


def test_prepare_data_verifies_on_rerun_and_fetches_a_corrupt_file_again(tmp_path, knowedit_hub, capsys):
    args = ["knowedit", "--cache-dir", str(tmp_path)]
    assert prepare_data_main(args) == 0
    assert prepare_data_main(args) == 0
    assert len(knowedit_hub) == len(FILES), "a verified re-run downloads nothing"
    assert capsys.readouterr().out.count("verified    ") == len(FILES)
    corrupt = tmp_path / "data" / "ZsRE" / "ZsRE-test-all.json"
    corrupt.write_bytes(corrupt.read_bytes()[:-10])
    assert prepare_data_main(args) == 0
    out = capsys.readouterr().out
    assert "corrupt     ZsRE/ZsRE-test-all.json" in out
    assert knowedit_hub[-1][1] == "benchmark/ZsRE/ZsRE-test-all.json" and len(knowedit_hub) == len(FILES) + 1
    assert corrupt.read_bytes() == DEMO_ZSRE.read_bytes()


def test_prepare_data_offline_is_one_line_and_exit_2(tmp_path, knowedit_hub, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HF_HUB_OFFLINE is set" in err and "Traceback" not in err
    assert not knowedit_hub


def test_prepare_data_detects_corruption_offline(tmp_path, knowedit_hub, monkeypatch, capsys):
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 0
    (tmp_path / "data" / "WikiBio" / "wikibio-test-all.json").write_text("[]")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "corrupt     WikiBio/wikibio-test-all.json" in captured.out
    assert "WikiBio/wikibio-test-all.json has to be downloaded" in captured.err


def test_prepare_data_without_a_connection_is_exit_2(tmp_path, monkeypatch, capsys):
    def unreachable(*args, **kwargs):  # what huggingface_hub raises when the hub cannot be reached
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be reached" in err


def test_prepare_data_refuses_bytes_that_differ_from_the_manifest(tmp_path, knowedit_hub, capsys):
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 0
    manifest = _manifest(tmp_path)
    manifest["files"]["wiki_recent/recent_train.json"] = "0" * 64
    (tmp_path / "data" / MANIFEST).write_text(json.dumps(manifest))
    assert prepare_data_main(["knowedit", "--cache-dir", str(tmp_path)]) == 1
    assert "ChecksumError" in capsys.readouterr().err


def test_prepare_data_fetches_every_knowedit_name():
    knowedit = {rel for name, rel in sources.NAMES.items() if name.startswith("knowedit/")}
    assert knowedit <= set(FILES)


def test_prepare_data_takes_only_a_commit_as_revision(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prepare_data_main(["knowedit", "--cache-dir", str(tmp_path), "--revision", "main"])
    assert exit_.value.code == 2 and "not a commit hash" in capsys.readouterr().err

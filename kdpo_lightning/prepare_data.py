"""`kdpo-lightning prepare-data knowedit`: fetch the KnowEdit benchmark files (`zjunlp/KnowEdit` on the
Hugging Face hub, folder `benchmark/`) into the data cache, the last folder of the data search path
(`sources.data_dirs`), in the layout `sources.NAMES` expects. Their sha256 go to a manifest beside them;
a re-run verifies every file and downloads again only what is missing or corrupt.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .models import cache_root, error_line, file_sha256
from .saving import atomic_write
from .sources import data_dirs

REPO = "zjunlp/KnowEdit"
REVISION = "6d218881e60c7c8be836bd2befd598eb3b318be4"  # pinned: the head of main (its last commit edits the card)
FILES = (  # under the data folder; on the hub under benchmark/
    "ZsRE/ZsRE-test-all.json",
    "WikiBio/wikibio-test-all.json",
    "WikiBio/wikibio-train-all.json",
    "wiki_counterfact/train_cf.json",
    "wiki_counterfact/test_cf.json",
    "wiki_recent/recent_train.json",
    "wiki_recent/recent_test.json",
)
MANIFEST = "knowedit.manifest.json"


class HubUnreachableError(ConnectionError):
    """A file has to be downloaded, but HF_HUB_OFFLINE is set or the hub cannot be reached."""


class ChecksumError(ValueError):
    """A downloaded file differs from the sha256 the manifest recorded for the same revision."""


def prepare_knowedit(dest: Path, revision: str = REVISION, log: Callable[[str], None] = print) -> dict[str, str]:
    """Make `dest` hold every file of FILES with the sha256 its manifest records, downloading the missing,
    corrupt and unrecorded ones; returns {file: sha256} as written to the manifest."""
    manifest = _read_manifest(dest / MANIFEST)
    recorded = manifest["files"] if manifest.get("revision") == revision else {}
    hashes = {}
    for rel in FILES:
        path, expected = dest / rel, recorded.get(rel)
        if expected and path.is_file():
            actual = file_sha256(path)
            if actual == expected:
                log(f"verified    {rel}")
                hashes[rel] = actual
                continue
            log(f"corrupt     {rel}: sha256 {actual}, the manifest says {expected}; downloading it again")
        _download(rel, dest, revision)
        hashes[rel] = file_sha256(path)
        if expected and hashes[rel] != expected:
            raise ChecksumError(f"{path}: downloaded from {REPO}@{revision} with sha256 {hashes[rel]}, but "
                                f"{dest / MANIFEST} records {expected} for that revision")
        log(f"downloaded  {rel}  sha256 {hashes[rel]}")
    _write_manifest(dest / MANIFEST, revision, hashes)
    return hashes


def _read_manifest(path: Path) -> dict:
    """The manifest's content, or {} when there is none or it is unreadable (then every file is fetched)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else {}


def _write_manifest(path: Path, revision: str, hashes: dict[str, str]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({"repo": REPO, "revision": revision, "files": hashes}, indent=1) + "\n")


def _download(rel: str, dest: Path, revision: str) -> None:
    """Download benchmark/<rel> of the dataset repo to dest/<rel>, through a temp folder in `dest` and a rename."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if constants.is_offline_mode():
        raise HubUnreachableError(f"{rel} has to be downloaded from {REPO}, but HF_HUB_OFFLINE is set")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        try:
            got = hf_hub_download(REPO, f"benchmark/{rel}", repo_type="dataset", revision=revision, local_dir=tmp)
        except (LocalEntryNotFoundError, ConnectionError) as e:  # what huggingface_hub raises without a connection
            raise HubUnreachableError(f"{rel} has to be downloaded from {REPO}, but the hub cannot be reached "
                                      f"({error_line(e)})") from None
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(got, dest / rel)


def _commit(revision: str) -> str:
    """A commit hash: a branch moves, and the manifest's checksums would no longer hold."""
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise argparse.ArgumentTypeError(f"{revision!r} is not a commit hash (40 hex digits); a branch moves, "
                                         "and the recorded checksums would no longer hold")
    return revision


def prepare_data_main(argv: list[str] | None = None) -> int:
    """CLI: `kdpo-lightning prepare-data knowedit [--cache-dir DIR] [--revision REV]`; 2 when offline."""
    parser = argparse.ArgumentParser(prog="kdpo-lightning prepare-data",
                                     description=f"Download the KnowEdit files ({REPO}) once, with checksums.")
    parser.add_argument("name", choices=["knowedit"])
    parser.add_argument("--cache-dir", help="default: $KDPO_LIGHTNING_CACHE or ~/.cache/kdpo_lightning; "
                                            "the files go to its data/ folder")
    parser.add_argument("--revision", default=REVISION, type=_commit,
                        help=f"a commit of {REPO}, 40 hex digits (default: {REVISION})")
    args = parser.parse_args(argv)
    dest = cache_root(args.cache_dir) / "data"
    try:
        prepare_knowedit(dest, args.revision)
    except HubUnreachableError as e:
        print(f"kdpo-lightning prepare-data: error: {e}. Run it where the hub is reachable, or copy the files "
              f"from benchmark/ of {REPO} into {dest} keeping their folders.", file=sys.stderr)
        return 2
    except (OSError, ChecksumError) as e:  # a file gone from that revision, hub errors, disk full
        print(f"kdpo-lightning prepare-data: error: {error_line(e)}", file=sys.stderr)
        return 1
    print(f"KnowEdit ({REPO}@{args.revision}) is in {dest}: data.path knowedit/zsre, knowedit/wikibio, "
          "knowedit/wiki_counterfact and knowedit/wiki_recent now find it.")
    if dest not in data_dirs():
        print(f"{dest} is not on the data search path: set KDPO_LIGHTNING_DATA={dest} when you run.")
    return 0

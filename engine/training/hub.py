"""model.weights as a Hugging Face hub id (`owner/name`). huggingface_hub does the download and the cache (HF_HOME,
HF_HUB_CACHE and HF_HUB_OFFLINE as it documents them, so a cache filled on a connected machine serves an offline
one); this module only fetches the files an encoder names from one snapshot, reads the licence off its model card,
and turns a failure (offline without the files, an unknown revision) into one line that says how to fetch them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import constants, errors, hf_hub_download

from engine.utils.errors import CT3DError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
CARD = "README.md"  # the model card; its YAML front matter's `license` is the weights' licence


@dataclass(frozen=True)
class Snapshot:
    folder: Path  # the cache's snapshot folder holding the files
    revision: str  # the commit it is


def is_hub_id(weights: str) -> bool:
    """An `owner/name` that is not a local path."""
    return bool(HUB_ID.fullmatch(weights)) and not Path(weights).exists()


def fetch(repo_id: str, files: tuple[str, ...], revision: str = "") -> Snapshot:
    """`files` of `repo_id` at `revision` (empty: main), all from the one commit the first resolves to, and its
    model card where the hub or the cache has one."""
    try:
        first = Path(hf_hub_download(repo_id, files[0], revision=revision or None))
        commit = first.parent.name  # the cache's snapshots/<commit>/<file>
        for name in files[1:]:
            hf_hub_download(repo_id, name, revision=commit)
    except (OSError, errors.HFValidationError) as exc:  # the hub's errors are OSErrors (HTTP, not in the cache)
        raise CT3DError(_failure(exc, repo_id, files, revision)) from None
    try:
        hf_hub_download(repo_id, CARD, revision=commit)
    except OSError:
        pass  # no card (or not fetched with the weights): the encoder's known licence stands
    return Snapshot(first.parent, commit)


def _failure(exc: Exception, repo_id: str, files: tuple[str, ...], revision: str) -> str:
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"config error: model.weights_revision: {revision!r} is not a commit, branch or tag of {repo_id}"
    if isinstance(exc, errors.LocalEntryNotFoundError):  # offline (HF_HUB_OFFLINE=1 or no network), not cached
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        fetch_line = (f"HF_HUB_CACHE=DIR hf download {repo_id} {' '.join(files)} {CARD}"
                      + (f" --revision {revision}" if revision else ""))
        return (f"config error: model.weights: {repo_id}{at} ({', '.join(files)}) is neither a local path nor in "
                f"the Hugging Face cache {constants.HF_HUB_CACHE}, and {why}; on a connected machine run "
                f"`{fetch_line}` with DIR a folder this machine mounts, then run here with HF_HUB_CACHE=DIR "
                f"HF_HUB_OFFLINE=1")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return (f"config error: model.weights: {repo_id} is not a local path, nor a hub repository this machine may "
                f"read (a gated or private one needs HF_TOKEN)")
    if isinstance(exc, errors.EntryNotFoundError):
        return f"config error: model.weights: {repo_id}{at} has no {' or '.join(files)}: is it this encoder's?"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"config error: model.weights: {repo_id}{at} cannot be fetched ({first_line})"


def card_licence(folder: Path) -> str:
    """The `license` of the model card (README.md's YAML front matter) in `folder`; empty if none says."""
    try:
        text = (folder / CARD).read_text(encoding="utf-8")
        front = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else None
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        return ""
    licence = front.get("license") if isinstance(front, dict) else None
    if isinstance(licence, list):
        licence = ", ".join(str(x) for x in licence)
    if licence == "other" and front.get("license_name"):
        licence = f"other ({front['license_name']})"
    return str(licence or "")

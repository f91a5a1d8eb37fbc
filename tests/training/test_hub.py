"""model.weights as a Hugging Face hub id, offline: a cache folder in huggingface_hub's own layout (checked by its
scan_cache_dir) holding random weights in the upstream layouts; loading by id equals loading by folder,
weights_revision pins one of two snapshots, the record names source, commit, SHA-256 and licence through to the
checkpoint, summary.json and report, and a missing cache is one line that says how to fill it (exit 2)."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from test_encoders import ctfm_upstream

from engine.config.loading import load_config
from engine.config.schema import ModelConfig
from engine.training.encoders import HUB_IDS, MERLIN_FILE, create_encoder_model, load_weights, weights_file
from engine.training.hub import card_licence
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import ENV, ROOT, TEXT, command, tiny_overrides

CTFM = HUB_IDS["ctfm"]
OLD, NEW = "a" * 40, "b" * 40  # two commits of one repository
CARD = "---\nlicense: cc-by-nc-4.0\ntags:\n- medical\n---\n# CT-FM\n"  # not the known Apache-2.0: read off the card


def cache_snapshot(cache, repo_id: str, folder, commit: str, *refs: str) -> None:
    """`folder`'s files as `commit` of `repo_id` in a Hugging Face cache, laid out as huggingface_hub lays it:
    each file's bytes once in blobs/ (named by SHA-256, as the hub names LFS files), snapshots/<commit>/<name> a
    relative link to the blob, and refs/<ref> holding the commit (no newline: huggingface_hub reads it whole)."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for file in folder.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        link = repo / "snapshots" / commit / file.name
        for parent in (blob.parent, link.parent):
            parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no hub. huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the
    environment once, at import, into its `constants` module, which its functions read at each call."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def ctfm_folder(folder, seed: int, card: bool = False):
    folder.mkdir()
    ctfm_upstream(folder, seed)
    if card:
        (folder / "README.md").write_text(CARD)
    return folder


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loaded(weights: str, revision: str = ""):
    model = ModelConfig(name="ctfm", weights=weights, weights_revision=revision)
    net = create_encoder_model(model, 2)
    return net, load_weights(net, model)


def test_a_hub_id_loads_from_the_offline_cache_the_tensors_its_folder_gives(offline, tmp_path):
    folder = ctfm_folder(tmp_path / "published", seed=0, card=True)
    cache_snapshot(offline, CTFM, folder, NEW, "main")
    assert [r.repo_id for r in scan_cache_dir(offline).repos] == [CTFM]  # huggingface_hub reads our layout
    by_id, record = loaded(CTFM)
    (folder / "README.md").unlink()
    by_folder, local = loaded(str(folder))
    assert by_id.encoder.state_dict().keys() == by_folder.encoder.state_dict().keys()
    assert all(torch.equal(v, by_folder.encoder.state_dict()[k]) for k, v in by_id.encoder.state_dict().items())
    sha = digest(folder / "model.safetensors")
    assert record == {"encoder": "ctfm", "source": CTFM, "revision": NEW, "sha256": sha, "licence": "cc-by-nc-4.0",
                      "file": record["file"], "config": local["config"]}
    assert record["file"].endswith(f"snapshots/{NEW}/model.safetensors")
    assert (local["source"], local["revision"], local["sha256"], local["licence"]) == (str(folder), "", sha,
                                                                                        "Apache-2.0")


def test_weights_revision_pins_one_of_two_snapshots_by_commit_or_tag(offline, tmp_path):
    old = ctfm_folder(tmp_path / "old", seed=1)
    new = ctfm_folder(tmp_path / "new", seed=2)
    cache_snapshot(offline, CTFM, old, OLD, "v1")
    cache_snapshot(offline, CTFM, new, NEW, "main")
    assert digest(old / "model.safetensors") != digest(new / "model.safetensors")
    for revision, folder, commit in (("", new, NEW), (OLD, old, OLD), ("v1", old, OLD)):
        net, record = loaded(CTFM, revision)
        assert (record["revision"], record["sha256"]) == (commit, digest(folder / "model.safetensors"))
        _, by_folder = loaded(str(folder))
        assert record["sha256"] == by_folder["sha256"]
    with pytest.raises(CT3DError, match=r"model.weights_revision: 'v1' pins a hub commit, but model.weights"):
        loaded(str(old), "v1")


def test_merlins_hub_id_is_its_published_file_with_the_cards_licence(offline, tmp_path):
    folder = tmp_path / "merlin"
    folder.mkdir()
    (folder / MERLIN_FILE).write_bytes(b"the file's bytes")  # resolving only: loading is test_encoders'
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    cache_snapshot(offline, HUB_IDS["merlin"], folder, NEW, "main")
    path = weights_file("merlin", HUB_IDS["merlin"])
    assert path.read_bytes() == b"the file's bytes" and path.parent.name == NEW and card_licence(path.parent) == "mit"


@pytest.mark.parametrize("revision", ["", "v2"])
def test_offline_without_the_files_is_one_line_naming_id_files_and_the_fetch_command(offline, tmp_path, revision):
    if revision:  # the repository is cached, but not at this revision
        cache_snapshot(offline, CTFM, ctfm_folder(tmp_path / "main", seed=0), NEW, "main")
    with pytest.raises(CT3DError) as failure:
        loaded(CTFM, revision)
    message = str(failure.value)
    assert "\n" not in message and str(offline) in message and "HF_HUB_OFFLINE=1" in message
    at = f" --revision {revision}" if revision else ""
    assert f"`HF_HUB_CACHE=DIR hf download {CTFM} config.json model.safetensors README.md{at}`" in message
    with pytest.raises(CT3DError, match=f"stanfordmimi/Merlin .*{MERLIN_FILE}.*hf download stanfordmimi/Merlin"):
        weights_file("merlin", HUB_IDS["merlin"])


@pytest.mark.slow  # a new interpreter (~8 s of imports): huggingface_hub reads HF_* as it imports
def test_the_cli_exits_2_offline_without_the_cache(tmp_path, tiny_demo):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    proc = subprocess.run(command("train", *tiny_overrides(tmp_path, tiny_demo, "model.name=ctfm",
                                                           f"model.weights={CTFM}", "model.preprocess_check=false")),
                          cwd=ROOT, capture_output=True, **TEXT, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"hf download {CTFM} config.json model.safetensors" in proc.stderr


def test_the_record_reaches_checkpoint_summary_and_report(offline, tmp_path, tiny_demo):
    folder = ctfm_folder(tmp_path / "published", seed=0, card=True)
    cache_snapshot(offline, CTFM, folder, NEW, "main")
    run = train(load_config(None, tiny_overrides(
        tmp_path, tiny_demo, "model.name=ctfm", f"model.weights={CTFM}", "model.preprocess_check=false",
        "model.freeze=true", "train.epochs=1", "preprocess.spatial_size=[16,16,16]", "metrics.bootstrap=0")))
    shutil.rmtree(offline)  # what follows reads the run's own files only
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)["encoder"]
    summary = json.loads((run / "summary.json").read_text())["encoder"]
    wanted = {"source": CTFM, "revision": NEW, "sha256": digest(folder / "model.safetensors"),
              "licence": "cc-by-nc-4.0"}
    assert {k: final[k] for k in wanted} == {k: summary[k] for k in wanted} == wanted
    page = (run / "report.html").read_text()
    assert all(value in page for value in wanted.values())

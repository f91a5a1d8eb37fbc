"""The embedding cache: a frozen encoder's head trained from cached embeddings equals the same head trained end to
end on the encoder; a second run extracts nothing; killed or damaged extraction is redone for the missing volumes
only; shards split the volumes; head checkpoints name the encoder by SHA-256 and serving rebuilds encoder + head."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from engine.config.loading import load_config
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import tiny_overrides

SMALL_CTFM = {"spatial_dims": 3, "in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 2]}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """CT-FM's folder as save_pretrained writes it (random weights), and its model.safetensors' bytes."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    folder = tmp_path_factory.mktemp("ctfm")
    torch.manual_seed(3)
    state = SegResEncoder(**SMALL_CTFM).state_dict()
    (folder / "config.json").write_text(json.dumps(SMALL_CTFM))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def probe_overrides(tmp_path, datalist, weights, *extra) -> list[str]:
    """A frozen CT-FM probe on the phantoms, nothing random but the head and the batch order: its overrides."""
    return tiny_overrides(
        tmp_path, datalist, "model.name=ctfm", f"model.weights={weights}", "model.preprocess_check=false",
        "model.freeze=true", "augment.enabled=false", "train.epochs=2", "loader.batch_size=5",
        "data.val_fraction=0.5", "preprocess.spatial_size=[16,16,16]", "metrics.bootstrap=0", "model.dropout=0.2",
        "cache.embedding_dtype=float32", *extra)


def probe(tmp_path, tiny_demo, weights, *extra):
    return load_config(None, probe_overrides(tmp_path, tiny_demo, weights, *extra))


def shards(cache_dir):
    return sorted((cache_dir / "embeddings").glob("*/shard-*.safetensors"))


def test_a_head_on_cached_embeddings_equals_the_head_trained_on_the_frozen_encoder(tmp_path, tiny_demo, weights,
                                                                                  caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="ct3d")
    cached = train(probe(tmp_path, tiny_demo, weights, "output.name=cached"))
    assert "of 24 volumes extracted" in caplog.text or "24 of 24" in caplog.text
    direct = train(probe(tmp_path, tiny_demo, weights, "cache.embeddings=false", "output.name=direct"))
    ours, theirs = (torch.load(f / "checkpoints" / "final.pt", weights_only=True) for f in (cached, direct))
    assert set(ours["model"]) == set(theirs["model"]) == {"head.1.weight", "head.1.bias"}  # the encoder by digest
    for key in ours["model"]:
        assert torch.allclose(ours["model"][key], theirs["model"][key], atol=1e-5, rtol=0), key
    summaries = [json.loads((f / "summary.json").read_text()) for f in (cached, direct)]
    assert abs(summaries[0]["best"]["val_loss"] - summaries[1]["best"]["val_loss"]) < 1e-5
    assert summaries[0]["embeddings"]["extracted"] == 24 and "embeddings" not in summaries[1]

    caplog.clear()  # a second run on the same data and encoder: nothing extracted, no volume read (checked either)

    def unread(*_):
        raise AssertionError("a volume was read")

    monkeypatch.setattr("engine.data.cache.preprocess", unread)
    again = train(probe(tmp_path, tiny_demo, weights, "output.name=again"))
    assert "all 24 volumes cached: no extraction" in caplog.text
    assert json.loads((again / "summary.json").read_text())["embeddings"]["extracted"] == 0


def test_a_damaged_shard_is_removed_and_only_its_volumes_are_extracted_again(tmp_path, tiny_demo, weights):
    from engine.commands import embed

    cfg = probe(tmp_path, tiny_demo, weights)
    first = embed(cfg, (0, 2))  # half of them: as if the extraction had been killed after its shards
    assert 0 < first["extracted"] == first["owned"] < 24 and not first["problems"]
    (only,) = shards(tmp_path / "cache")
    table = {}
    second = embed(cfg, (0, 1))  # the rest, no more
    assert second["extracted"] == 24 - first["extracted"] and second["cached"] == first["extracted"]
    from safetensors import safe_open

    for path in shards(tmp_path / "cache"):
        with safe_open(str(path), "pt") as f:
            table.update(zip(json.loads(f.metadata()["names"]), f.get_tensor("embeddings").clone()))
    assert len(table) == 24
    only.write_bytes(only.read_bytes()[:100])  # truncated: unreadable
    third = embed(cfg, (0, 1))
    assert third["extracted"] == first["extracted"] and not only.exists()
    with safe_open(str(max(shards(tmp_path / "cache"), key=lambda p: p.stat().st_mtime_ns)), "pt") as f:
        for name, row in zip(json.loads(f.metadata()["names"]), f.get_tensor("embeddings")):
            assert torch.equal(row, table[name])  # redone, the same


def test_shards_split_the_volumes_between_them(tmp_path, tiny_demo, weights):
    from engine.commands import embed

    cfg = probe(tmp_path, tiny_demo, weights)
    counts = [embed(cfg, (i, 3)) for i in range(3)]
    assert sum(c["extracted"] for c in counts) == 24 and all(c["owned"] == c["extracted"] for c in counts)
    assert embed(cfg, (0, 1))["extracted"] == 0


def test_serving_rebuilds_encoder_and_head_and_verifies_the_encoders_digest(tmp_path, tiny_demo, weights):
    from engine.serving.inference import load_trained_model

    folder = train(probe(tmp_path, tiny_demo, weights, "train.epochs=1"))
    best = folder / "checkpoints" / "best.pt"
    model, state = load_trained_model(str(best), torch.device("cpu"))
    assert state["encoder"]["sha256"] and set(state["model"]) == {"head.1.weight", "head.1.bias"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(SMALL_CTFM))
    other_state = {k: (torch.randn(v.shape) if v.is_floating_point() else v).contiguous()
                   for k, v in model.encoder.encoder.state_dict().items()}
    save_file(other_state,
              str(other / "model.safetensors"))
    with pytest.raises(CT3DError, match="SHA-256"):
        load_trained_model(str(best), torch.device("cpu"), str(other))

    from engine.serving.commands import export  # the whole network, encoder and head, as one file

    path = export(load_config(None, [f"checkpoint={best}", "format=torchscript", f"output.dir={tmp_path}",
                                     "output.name=exported"], command="export"))
    image = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(path))(image), model(image), atol=1e-5)


def test_embed_is_refused_where_the_run_would_not_read_embeddings(tmp_path, tiny_demo, weights):
    from engine.commands import embed

    with pytest.raises(CT3DError, match="augment.enabled=false"):
        embed(probe(tmp_path, tiny_demo, weights, "augment.enabled=true"))


def test_predict_from_a_head_checkpoint_reproduces_the_runs_validation_probabilities(tmp_path, tiny_demo, weights):
    """The run validated its head on cached embeddings; predict runs encoder + head on the volumes."""
    import csv

    from ignite.engine import Events

    from engine.serving.commands import predict

    seen = []

    def keep_validation(trainer, evaluator):
        evaluator.add_event_handler(Events.STARTED, lambda _: seen.clear())
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["pred"]))

    folder = train(probe(tmp_path, tiny_demo, weights, "train.epochs=1"), attach=keep_validation)
    expected = torch.sigmoid(torch.cat(seen))  # metrics.calibrate is off: predict's probabilities are these
    val = [row["volume"] for row in csv.DictReader(open(folder / "split.csv")) if row["split"] == "validation"]
    path = predict(load_config(None, [f"checkpoint={folder / 'checkpoints' / 'best.pt'}", f"input={tiny_demo}",
                                      f"output.dir={tmp_path}", "output.name=predicted"], command="predict"))
    rows = {row[0]: [float(p) for p in row[1:5]] for row in list(csv.reader(open(path)))[1:]}
    assert len(val) == len(expected) == 10
    assert torch.allclose(torch.tensor([rows[name] for name in val]), expected, atol=2e-6, rtol=0)


def test_the_folder_is_named_by_everything_that_changes_an_embedding_and_nothing_else(tmp_path):
    from engine.training.embeddings import EmbeddingCache

    base = {"format": 1, "encoder": "ctfm", "weights_sha256": "a" * 64, "weights_file": "/w/model.safetensors",
            "network": SMALL_CTFM, "pooling": "mean", "features": 16, "dtype": "float16", "precision": "float32",
            "volume_cache_key": "k", "preprocessing": {"spacing": [1.0, 1.0, 1.0]}}
    folder = EmbeddingCache(tmp_path, base).folder
    assert EmbeddingCache(tmp_path, {**base, "weights_file": "/elsewhere/model.safetensors"}).folder == folder
    for key, value in (("weights_sha256", "b" * 64), ("dtype", "float32"), ("precision", "bfloat16"),
                       ("volume_cache_key", "other"), ("preprocessing", {"spacing": [1.5, 1.5, 3.0]}),
                       ("encoder", "merlin"), ("pooling", "max"), ("format", 2), ("network", None)):
        assert EmbeddingCache(tmp_path, {**base, key: value}).folder != folder, key


def test_the_embed_command_names_a_bad_volume_and_exits_2_keeping_the_good_ones(tmp_path, tiny_demo, weights):
    import shutil

    from helpers import cli

    data = tmp_path / "data"
    shutil.copytree(tiny_demo.parent, data)
    (data / "train_0_a_1.nii.gz").write_bytes(b"not a volume")
    proc = cli("embed", *probe_overrides(tmp_path, data / "datalist.csv", weights))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "ct3d embed: 23 volume(s) extracted, 0 already cached" in proc.stdout
    assert "train_0_a_1.nii.gz" in proc.stdout and "Traceback" not in proc.stderr
    again = cli("embed", *probe_overrides(tmp_path, data / "datalist.csv", weights))  # the good ones kept
    assert again.returncode == 2 and "0 volume(s) extracted, 23 already cached" in again.stdout


def test_two_ranks_extract_half_each_and_train_the_head_on_all(tmp_path, tiny_demo, weights):
    """torchrun with gloo: each rank embeds the volumes its shard owns, then both read the whole table."""
    import subprocess
    import sys

    from helpers import ENV, ROOT, TEXT, command

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *command("train", *probe_overrides(tmp_path, tiny_demo, weights))[1:]], cwd=ROOT,
                          env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, **TEXT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["embeddings"]["extracted"] == 24 and summary["train_volumes"] == 14
    tags = {path.name.split("-")[1] for path in shards(tmp_path / "cache")}
    assert tags == {"0of2", "1of2"}  # both ranks wrote their own
    assert set(torch.load(tmp_path / "runs" / "run" / "checkpoints" / "final.pt",
                          weights_only=True)["model"]) == {"head.1.weight", "head.1.bias"}


def test_a_probe_resumed_with_other_encoder_weights_or_not_as_a_probe_is_refused(tmp_path, tiny_demo, weights):
    """The head was trained on one encoder: going on with another (or switching between cached embeddings and
    the encoder every epoch, which the optimizer's state cannot follow) is refused, naming why."""
    train(probe(tmp_path, tiny_demo, weights, "train.epochs=1"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(SMALL_CTFM))
    from safetensors.torch import load_file

    state = load_file(str(weights / "model.safetensors"))
    save_file({k: (v + 1 if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(other / "model.safetensors"))
    with pytest.raises(CT3DError, match="the checkpoint's encoder has weights of SHA-256"):
        train(probe(tmp_path, tiny_demo, other, "train.epochs=2"))
    with pytest.raises(CT3DError, match="trained its head on cached embeddings; this start would not"):
        train(probe(tmp_path, tiny_demo, weights, "train.epochs=2", "cache.embeddings=false"))


def test_a_probes_weights_only_file_loads_with_its_encoder(tmp_path, tiny_demo, weights):
    """W&B's best-weights.pt (write_weights_only) keeps the encoder's record: serving loads it again."""
    from engine.serving.inference import load_trained_model
    from engine.training.checkpoint import write_weights_only

    folder = train(probe(tmp_path, tiny_demo, weights, "train.epochs=1"))
    shared = write_weights_only(folder / "checkpoints" / "best.pt", tmp_path / "best-weights.pt")
    model, state = load_trained_model(str(shared), torch.device("cpu"))
    assert state["encoder"]["sha256"] and set(state["model"]) == {"head.1.weight", "head.1.bias"}

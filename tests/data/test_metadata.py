"""data.metadata: CT-RATE's raw scanner values rescaled to HU, with the spacing from the metadata CSV."""

import numpy as np
import pytest
import torch

from engine.config.loading import load_config
from engine.config.schema import PreprocessConfig
from engine.data import prepare
from engine.data.cache import DiskCacheDataset, cache_folder, source_hash
from engine.data.demo import phantom
from engine.data.preprocess import preprocessing_transform
from volumes import write_nifti

P = PreprocessConfig(spacing=[1.5, 1.5, 3.0], spatial_size=[24, 24, 16])

def check(cfg) -> int:
    """The `check` command on a loaded config."""
    return prepare.check(cfg.data, cfg.preprocess, cfg.cache, cfg.output.dir)



@pytest.fixture
def twins(tmp_path):
    """The same CT twice: in HU with its real spacing (CT-RATE's second release), and as raw values
    (HU = 2 * raw - 1024) with a unit spacing in the header (its first release) plus the metadata CSV."""
    hu = phantom(np.random.default_rng(0), (32, 32, 24), (1, 0, 0, 1)).astype(np.int32)
    hu -= hu % 2  # even, so the raw values are whole numbers
    (tmp_path / "hu").mkdir()
    (tmp_path / "raw").mkdir()
    hu_path = write_nifti(tmp_path / "hu" / "train_1_a_1.nii.gz", hu, spacing=(0.75, 0.75, 1.5))
    raw = (hu + 1024) // 2
    assert raw.min() >= 0
    raw_path = write_nifti(tmp_path / "raw" / "train_1_a_1.nii.gz", raw, spacing=(1.0, 1.0, 1.0))
    metadata = tmp_path / "metadata.csv"
    metadata.write_text("VolumeName,Manufacturer,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\n"
                        'train_1_a_1.nii.gz,SIEMENS,2,-1024,"[0.75, 0.75]",1.5\n')
    return hu_path, raw_path, metadata


def test_metadata_turns_raw_values_into_the_hu_twins_cached_tensor(tmp_path, twins):
    from engine.data.metadata import attach_metadata

    hu_path, raw_path, metadata = twins
    (raw_item,) = attach_metadata(metadata, ([{"image": str(raw_path), "name": raw_path.name, "label": [1.0]}],))[0]
    assert raw_item["rescale"] == [2.0, -1024.0] and raw_item["pixdim"] == [0.75, 0.75, 1.5]
    hu_item = {"image": str(hu_path), "name": hu_path.name}
    cache = DiskCacheDataset([], preprocessing_transform(P), cache_dir=cache_folder(tmp_path / "c", P),
                             hash_func=source_hash)
    from_raw = cache.entry({k: raw_item[k] for k in ("image", "name", "rescale", "pixdim")})["image"]
    from_hu = cache.entry(hu_item)["image"]
    assert from_raw.shape == from_hu.shape == (1, 24, 24, 16)
    assert torch.equal(from_raw, from_hu)
    # the metadata is part of the entry's name: the same file without it is another entry
    assert source_hash(raw_item) != source_hash({"image": str(raw_path), "name": raw_path.name})


def test_check_flags_raw_values_without_metadata_and_passes_them_with_it(tmp_path, twins, capsys):
    _, raw_path, metadata = twins
    for i in range(2, 5):  # a few more volumes, so the split has both sides
        (raw_path.parent / f"train_{i}_a_1.nii.gz").write_bytes(raw_path.read_bytes())
    datalist = raw_path.parent / "labels.csv"
    datalist.write_text("VolumeName,Lung nodule\n" + "".join(f"train_{i}_a_1.nii.gz,{i % 2}\n" for i in range(1, 5)))
    rows = metadata.read_text().splitlines()
    metadata.write_text("\n".join(rows + [rows[1].replace("train_1_", f"train_{i}_") for i in range(2, 5)]) + "\n")
    base = [f"data.train={datalist}", "data.demo.enabled=false", f"cache.dir={tmp_path / 'cache'}",
            "preprocess.spatial_size=[16,16,16]", "cache.workers=1"]
    assert check(load_config(None, base)) == 4
    out = capsys.readouterr().out
    assert "train_1_a_1.nii.gz: its air" in out and "raw scanner values" in out
    assert "first release" in out and "second release" in out and "data.metadata" in out
    assert check(load_config(None, [*base, f"data.metadata={metadata}"])) == 0


def test_volume_without_a_metadata_row_is_named(tmp_path, twins):
    from engine.data.metadata import attach_metadata
    from engine.utils.errors import CT3DError

    _, raw_path, metadata = twins
    items = [{"image": str(raw_path), "name": "train_9_a_1.nii.gz", "label": [0.0], "where": "labels.csv row 3"}]
    with pytest.raises(CT3DError, match=r"labels.csv row 3: train_9_a_1.nii.gz has no row in data.metadata"):
        attach_metadata(metadata, (items,))
    metadata.write_text("VolumeName,RescaleSlope,RescaleIntercept,XYSpacing,ZSpacing\nx.nii.gz,1,-1024,oops,1\n")
    with pytest.raises(CT3DError, match=r"metadata.csv row 2 \(x.nii.gz\): 'oops' is not a number"):
        attach_metadata(metadata, (items,))


def test_training_and_validation_metadata_both_apply(tmp_path, twins, capsys):
    """CT-RATE's layout: train_* volumes in one datalist and metadata file, valid_* in the other pair. With only
    the training file, each validation volume is named along with the file it was looked up in."""
    _, raw_path, metadata = twins
    header, row = metadata.read_text().splitlines()
    lists, files = {}, {}
    for split in ("train", "valid"):
        names = [f"{split}_{i}_a_1.nii.gz" for i in range(1, 4)]
        for name in names:
            (raw_path.parent / name).write_bytes(raw_path.read_bytes())
        lists[split] = raw_path.parent / f"{split}.csv"
        lists[split].write_text("VolumeName,Lung nodule\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))
        files[split] = tmp_path / f"{split}_metadata.csv"
        files[split].write_text("\n".join([header] + [row.replace("train_1_a_1.nii.gz", n) for n in names]) + "\n")
    base = [f"data.train={lists['train']}", f"data.val={lists['valid']}", "data.demo.enabled=false",
            f"cache.dir={tmp_path / 'cache'}", "preprocess.spatial_size=[16,16,16]", "cache.workers=1"]
    assert check(load_config(None, [*base, f"data.metadata={files['train']}"])) == 4  # 3 volumes, an empty split
    out = capsys.readouterr().out
    assert f"valid_2_a_1.nii.gz has no row in data.metadata ({files['train']})" in out
    both = load_config(None, [*base, f"data.metadata=[{files['train']},{files['valid']}]"])
    assert both.data.metadata == [str(files["train"]), str(files["valid"])]
    assert check(both) == 0
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"data:\n  train: {lists['train']}\n  metadata: {files['valid']}\n")  # one path, as before
    assert load_config(yaml).data.metadata == [str(files["valid"])]


def test_a_volume_with_different_rows_in_two_files_is_refused(tmp_path, twins):
    from engine.data.metadata import read_tables
    from engine.utils.errors import CT3DError

    _, _, metadata = twins
    other = tmp_path / "other.csv"
    other.write_text(metadata.read_text().replace(",2,-1024,", ",1,-1024,"))
    assert read_tables([str(metadata), str(metadata)]) == read_tables(str(metadata))
    with pytest.raises(CT3DError, match=f"train_1_a_1.nii.gz has different rows in {metadata} and {other}"):
        read_tables([str(metadata), str(other)])

"""Volumes found as hospitals export them: DICOM by content, several series per folder, compressed
transfer syntaxes, nothing left out without a reason."""

import numpy as np
import pytest
from pydicom.uid import JPEGLSLossless, RLELossless

from engine.config.loading import load_config
from engine.data import prepare
from engine.data.sources import find_volumes, is_dicom, read_volume, resolve_series
from engine.utils.errors import CT3DError
from helpers import cli, tiny_overrides
from volumes import recompress_with_itk, write_dicom_series, write_nifti


def check(cfg) -> int:
    """The `check` command on a loaded config."""
    return prepare.check(cfg.data, cfg.preprocess, cfg.cache, cfg.output.dir)



def hu_volume(shape=(16, 14, 6)) -> np.ndarray:
    """Values that tell the axes apart, with a slab of air (a CT in HU passes the air check)."""
    volume = (np.indices(shape).sum(0) * 37 % 900 - 500).astype(np.int16)
    volume[0] = -1000
    return volume


def export(folder, volume=None):
    """What a PACS export looks like: an axial series, a second reconstruction and a scout, in one folder,
    files named by their UIDs."""
    volume = hu_volume() if volume is None else volume
    write_dicom_series(folder, volume, description="Axial 1mm", suffix="")
    write_dicom_series(folder, volume[:, :, ::-1].copy(), description="Lung kernel", suffix="")
    write_dicom_series(folder, volume[:, :, :1], description="Topogram", suffix="", localizer=True)
    return folder


def test_dicom_is_found_by_content_not_by_name(tmp_path):
    series = write_dicom_series(tmp_path / "s", hu_volume(), suffix="")
    files = list(series.iterdir())
    assert all("." not in f.name.split("-")[0] or f.suffix != ".dcm" for f in files) and all(map(is_dicom, files))
    (tmp_path / "scan.dcm").write_bytes(b"not dicom at all" * 20)
    assert not is_dicom(tmp_path / "scan.dcm")
    items, skipped = find_volumes(tmp_path)
    assert [i["name"] for i in items] == ["s"]
    assert [p.name for p in skipped] == ["scan.dcm"] and "not a volume" in skipped[0].message


def test_each_series_is_a_volume_and_the_localizer_is_left_out_with_a_reason(tmp_path):
    export(tmp_path / "export")
    items, skipped = find_volumes(tmp_path)
    assert [i["name"] for i in items] == ["export/Axial 1mm", "export/Lung kernel"]
    assert len(skipped) == 1 and "localizer" in skipped[0].message
    axial, kernel = (read_volume(i["image"])[0] for i in items)
    assert np.array_equal(axial, hu_volume()) and np.array_equal(kernel, hu_volume()[:, :, ::-1])


def test_a_folder_with_several_series_must_be_named(tmp_path):
    export(tmp_path / "export")
    with pytest.raises(CT3DError, match=r"holds 2 DICOM series.*export/Axial 1mm.*export/Lung kernel"):
        resolve_series(tmp_path / "export")
    assert resolve_series(tmp_path / "export" / "Lung kernel").description == "Lung kernel"
    single = write_dicom_series(tmp_path / "one", hu_volume())
    write_dicom_series(single, hu_volume()[:, :, :1], description="Scout", suffix="", localizer=True)
    assert resolve_series(single).slices == 6  # the localizer beside it does not count


def test_check_names_a_datalist_entry_that_points_at_several_series(tmp_path, tiny_demo):
    lines = tiny_demo.read_text().splitlines()
    for line in lines[1:]:
        name = line.split(",")[0]
        (tmp_path / name).symlink_to(tiny_demo.parent / name)
    export(tmp_path / "export")
    label = ",".join(lines[1].split(",")[1:])
    rows = [*lines, f"export,{label}", f"export/Lung kernel,{label}"]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "list.csv"), command="check")
    assert check(cfg) == 1  # the folder, not the entry that names its series


@pytest.mark.parametrize("kind", ["JPEG", "JPEG2000", "JPEGLS", "RLE"])
def test_compressed_transfer_syntaxes_decode_to_the_same_voxels(tmp_path, kind):
    volume = hu_volume()
    if kind in ("JPEG", "JPEG2000"):  # pydicom cannot write these: ITK's GDCM does
        series = recompress_with_itk(write_dicom_series(tmp_path / "plain", volume), tmp_path / kind, kind)
    else:
        syntax = JPEGLSLossless if kind == "JPEGLS" else RLELossless
        series = write_dicom_series(tmp_path / kind, volume, compress=syntax)
    import pydicom

    syntax = pydicom.dcmread(next(series.iterdir())).file_meta.TransferSyntaxUID
    assert syntax.is_compressed and kind.replace("JPEG2000", "2000").replace("JPEGLS", "JPEG-LS")[:4] in syntax.name
    array, meta = read_volume(str(series))
    assert np.array_equal(array, volume)


def test_no_decoder_plugin_warning_at_start_up(tmp_path):
    write_dicom_series(tmp_path / "series", hu_volume((32, 32, 32)), suffix="")
    write_nifti(tmp_path / "v.nii.gz", hu_volume((32, 32, 32)))
    (tmp_path / "list.csv").write_text("VolumeName,x\nseries,1\nv.nii.gz,0\n")
    proc = cli("check", *tiny_overrides(tmp_path, tmp_path / "list.csv"), "data.val_fraction=0.5",
               "data.patient_pattern=''", fresh=True)  # fresh: a warning while MONAI is imported counts too
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nvimgcodec" not in (proc.stdout + proc.stderr).lower()


def test_a_named_pipe_in_a_predict_folder_is_listed_not_read(tmp_path):
    """Opening a FIFO to read it waits for a writer: predict would hang."""
    import os

    from engine.data.sources import find_volumes

    (tmp_path / "scans").mkdir()
    os.mkfifo(tmp_path / "scans" / "pipe.nii.gz")
    items, skipped = find_volumes(tmp_path / "scans")
    assert items == [] and [p.name for p in skipped] == ["pipe.nii.gz"] and "not a regular file" in str(skipped[0])

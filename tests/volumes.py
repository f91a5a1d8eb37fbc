"""Writers of small test volumes in every supported format."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_nifti(path: Path, volume: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.diag([*spacing, 1.0])), str(path))
    return path


def write_itk(path: Path, volume: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    """NRRD or MHA (by suffix), from an x, y, z array."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(volume.astype(np.int16).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    itk.imwrite(image, str(path))
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    """One CT image file per z slice, HU stored with RescaleIntercept -1024."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "test", k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(str(folder / f"slice{k:03d}.dcm"), enforce_file_format=True)
    return folder

"""Small test volumes: an HU phantom (air around a soft-tissue block), writers in every supported format, the
items a datalist would give for them, and a cache folder's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_nifti(path: Path, volume: np.ndarray, spacing=(2.0, 2.0, 2.0), lps: bool = False) -> Path:
    """`lps=True`: the array's axes run as ITK's and DICOM's do (x to the left, y to the back), so the file
    holds the same physical volume as write_itk and write_dicom_series write from the same array."""
    import nibabel as nib

    signs = (-1.0, -1.0, 1.0) if lps else (1.0, 1.0, 1.0)
    affine = np.diag([*(s * d for s, d in zip(signs, spacing)), 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), str(path))
    return path


def write_itk(path: Path, volume: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    """NRRD or MHA (by suffix), from an x, y, z array."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(volume.astype(np.int16).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    itk.imwrite(image, str(path))
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, spacing=(2.0, 2.0, 2.0), description: str = "",
                       suffix: str = ".dcm", localizer: bool = False, compress: str | None = None) -> Path:
    """One CT image file per z slice, HU stored with RescaleIntercept -1024. `suffix=""` names the files
    by their SOP instance UIDs, as PACS exports do; `compress` is a pydicom transfer syntax UID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / (f"slice{k:03d}{suffix}" if suffix else meta.MediaStorageSOPInstanceUID)
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "test", k + 1
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()
        if compress:
            ds.compress(compress)
        ds.save_as(str(path), enforce_file_format=True)
    return folder


def recompress_with_itk(source: Path, folder: Path, kind: str) -> Path:
    """Each slice of a series rewritten by ITK's GDCM with `kind` compression (JPEG: lossless process 14,
    JPEG2000: lossless), keeping every UID."""
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        image = itk.imread(str(path), itk.SS)
        io = itk.GDCMImageIO.New()
        io.SetUseCompression(True)
        io.SetCompressionType(getattr(itk.GDCMImageIOEnums, f"Compression_{kind}"))
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(image)].New(Input=image, FileName=str(folder / path.name), ImageIO=io,
                                             UseCompression=True).Update()
    return folder


def hu_volume(shape=(20, 24, 28)) -> np.ndarray:
    """Air (-1000 HU) around a block of soft tissue (40 HU), int16 as scanners store it."""
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[4:-4, 4:-4, 4:-4] = 40
    return vol


def items_for(*paths: Path) -> list[dict]:
    """Datalist items for `paths`, each with one positive label."""
    return [{"image": str(p), "label": [1.0], "name": p.name} for p in paths]


def cache_entries(root: Path) -> list[Path]:
    """Every file under a cache root."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def chest_volume(shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0), lung_reach_mm: float = 170.0,
                 padding: int = -2048) -> tuple[np.ndarray, np.ndarray]:
    """A chest CT as scanners write it, in HU (int16): air, a body of soft tissue 2 x (lung_reach + 10) mm wide,
    two lungs (-850 HU) whose outer edges lie `lung_reach_mm` from the centre in x and which run the scan's
    length less 20 mm at each end, and `padding` outside the reconstructed circle. Also the lung mask."""
    x, y, z = (((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s) for n, s in zip(shape, spacing))
    x, y = x[:, None, None], y[None, :, None]
    half_length = shape[2] * spacing[2] / 2 - 20
    vol = np.full(shape, -1000, dtype=np.int16)
    body = (x / (lung_reach_mm + 10)) ** 2 + (y / 130) ** 2 <= 1.0
    vol[np.broadcast_to(body, shape)] = 40
    lung_x = (lung_reach_mm - 20) / 2  # each lung spans 20 mm to lung_reach_mm from the midline
    lungs = np.zeros(shape, dtype=bool)
    z = z[None, None, :]
    for side in (-1, 1):
        lungs |= ((x - side * (20 + lung_x)) / lung_x) ** 2 + (y / 100) ** 2 + (z / half_length) ** 2 <= 1
    vol[lungs] = -850
    circle = x ** 2 + y ** 2 > (min(shape[0] * spacing[0], shape[1] * spacing[1]) / 2) ** 2
    vol[np.broadcast_to(circle, shape)] = padding
    return vol, lungs

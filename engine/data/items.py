"""What an item is: the keys a datalist row becomes (a dict per volume, named once here and passed around),
the volume file suffixes we read, and `Problem`, one bad row, volume or split named by file and row. Every
data module reads these; this module imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE, LABEL, NAME = "image", "label", "name"  # the keys every item carries
WHERE, PATIENT = "where", "patient"  # datalist file and row; patient id from data.patient_column
RELATIVE = "relative"  # the image's path under data.image_root (when set): what names its disk cache entry
RESCALE, PIXDIM = "rescale", "pixdim"  # per-volume metadata (data.metadata): [slope, intercept], [x, y, z] mm
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # DICOM is found by content


@dataclass
class Problem:
    """One bad row, volume or split, named by file and row."""

    where: str
    message: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def format_problems(problems: list[Problem], limit: int = 20) -> str:
    shown = [str(p) for p in problems[:limit]]
    return "\n  ".join(shown + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else []))

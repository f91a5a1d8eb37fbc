"""The embedded demo data set: chest-CT phantoms in Hounsfield units, written as NIfTI plus a
CT-RATE style CSV, so the demo runs through the same code path as real data."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from engine.utils.errors import CT3DError
from engine.utils.io import atomic_write

LABELS = ("Lung nodule", "Pleural effusion", "Emphysema", "Cardiomegaly")
PREVALENCE = 0.35  # each finding independently, so every label sits in the 20-50% band
SPACING_MM = (6.0, 6.0, 5.0)  # x, y, z: a 64x64x64 phantom covers 384 x 384 x 320 mm

AIR, FAT, SOFT, LUNG, EMPHYSEMA, FLUID, BONE = -1000, -100, 40, -850, -975, 15, 700


def _ellipsoid(grid, centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def phantom(rng: np.random.Generator, shape=(64, 64, 64), findings=(0, 0, 0, 0), nodule_mask: bool = False):
    """One chest CT in HU, int16, axes x (right-left), y (posterior-anterior), z (inferior-superior).
    `findings` switches on the LABELS in order. With `nodule_mask`, also the nodules' voxels (a bool
    array; the same draws, so the image is the same either way)."""
    nodule, effusion, emphysema, cardiomegaly = (bool(f) for f in findings)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    grid = (x, y, z)
    jitter = lambda s: rng.uniform(-s, s)  # noqa: E731
    body_a, body_b = 0.82 + jitter(0.06), 0.58 + jitter(0.05)
    shift = (jitter(0.03), jitter(0.03), 0.0)
    img = np.full(shape, AIR, dtype=np.float32)
    body = ((x - shift[0]) / body_a) ** 2 + ((y - shift[1]) / body_b) ** 2 <= 1.0
    inner = ((x - shift[0]) / (body_a - 0.07)) ** 2 + ((y - shift[1]) / (body_b - 0.07)) ** 2 <= 1.0
    img[body] = FAT
    img[inner] = SOFT

    lung_r = (0.27 * body_a / 0.82 + jitter(0.02), 0.42 * body_b / 0.58, 0.72 + jitter(0.05))
    lungs = []
    for side in (-1, 1):
        centre = (side * 0.37 * body_a + shift[0], 0.0 + shift[1], 0.08)
        lungs.append(_ellipsoid(grid, centre, lung_r))
    lung = lungs[0] | lungs[1]
    img[lung] = LUNG + rng.normal(0, 25, size=int(lung.sum()))

    heart_scale = (1.4 if cardiomegaly else 1.0) * (1 + jitter(0.06))
    heart_r = tuple(r * heart_scale for r in (0.2, 0.22, 0.24))
    heart = _ellipsoid(grid, (0.06 + shift[0], 0.12 + shift[1], -0.3), heart_r)
    img[heart] = SOFT + 5
    aorta = ((x - 0.05 - shift[0]) / 0.06) ** 2 + ((y + 0.12 - shift[1]) / 0.06) ** 2 <= 1.0
    img[aorta & (z > -0.1)] = SOFT + 10
    spine = (x - shift[0]) ** 2 + ((y + body_b * 0.72 - shift[1]) / 0.9) ** 2 <= 0.11**2
    img[spine] = BONE

    if emphysema:
        coarse = rng.normal(size=tuple(max(2, n // 8) for n in shape)).astype(np.float32)
        field = np.kron(coarse, np.ones((8, 8, 8), dtype=np.float32))[: shape[0], : shape[1], : shape[2]]
        patches = lung & (field > 0.3) & (z > -0.3)
        img[patches] = EMPHYSEMA + rng.normal(0, 10, size=int(patches.sum()))
    if effusion:
        for side in rng.permutation(2)[: rng.integers(1, 3)]:
            level = -lung_r[1] + shift[1] + rng.uniform(0.3, 0.5) * 2 * lung_r[1]
            fluid = lungs[side] & (y < level)
            img[fluid] = FLUID
    nodules = np.zeros(shape, dtype=bool)
    if nodule:
        coords = np.argwhere(lung & ~heart)
        for _ in range(rng.integers(2, 5)):
            centre_vox = coords[rng.integers(len(coords))]
            radius_vox = rng.uniform(3.0, 4.5)
            centre = tuple(-1 + 2 * c / (n - 1) for c, n in zip(centre_vox, shape))
            radii = tuple(radius_vox * 2 / (n - 1) for n in shape)
            nodules |= _ellipsoid(grid, centre, radii) & lung
        img[nodules] = SOFT + 20

    img += rng.normal(0, 12, size=shape)
    image = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    return (image, nodules) if nodule_mask else image


def replay(num_volumes: int = 200, shape=(64, 64, 64), seed: int = 0):
    """(volume name, findings, image, nodule mask) of each phantom `generate` writes with these arguments,
    in order: the generator's own draws, so a test knows where every nodule is."""
    rng = np.random.default_rng(seed)
    for i in range(num_volumes):
        findings = tuple(int(v) for v in rng.random(len(LABELS)) < PREVALENCE)
        image, nodules = phantom(rng, tuple(shape), findings, nodule_mask=True)
        yield f"train_{i}_a_1.nii.gz", findings, image, nodules


def generate(out_dir: str | Path, num_volumes: int = 200, shape=(64, 64, 64), seed: int = 0,
             labels: tuple[str, ...] = LABELS) -> Path:
    """Writes `num_volumes` phantoms and `datalist.csv` (columns in `labels` order) once; returns the CSV path.
    Same arguments, same files: an existing complete set is reused. `labels` must hold the four findings;
    other names get random labels (prevalence PREVALENCE, drawn apart from the images: the phantoms are the
    same whatever the labels) with nothing in the image to find."""
    import nibabel as nib

    if missing := [name for name in LABELS if name not in labels]:
        raise CT3DError(f"config error: data.demo.labels: the phantoms show {', '.join(LABELS)}; the list lacks "
                        f"{', '.join(missing)}")
    out = Path(out_dir)
    params = {"num_volumes": num_volumes, "shape": list(shape), "seed": seed, "labels": list(labels), "version": 1}
    csv_path, params_path = out / "datalist.csv", out / "demo.json"
    if csv_path.is_file() and params_path.is_file() and json.loads(params_path.read_text()) == params:
        return csv_path
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*SPACING_MM, 1.0])
    rows, extra = [], [name for name in labels if name not in LABELS]
    no_evidence = np.random.default_rng([seed, 1])
    for name, findings, volume, _ in replay(num_volumes, shape, seed):
        image = nib.Nifti1Image(volume, affine)
        image.header.set_xyzt_units("mm")
        with atomic_write(out / name) as tmp:
            nib.save(image, str(tmp))
        rows.append({"VolumeName": name, **dict(zip(LABELS, findings)),
                     **{label: int(no_evidence.random() < PREVALENCE) for label in extra}})
    with atomic_write(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["VolumeName", *labels])
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(params_path) as tmp:
        tmp.write_text(json.dumps(params))
    return csv_path


if __name__ == "__main__":
    print(generate(os.environ.get("CT3D_DEMO_DIR", ".ct3d/demo")))

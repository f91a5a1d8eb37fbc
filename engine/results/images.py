"""Pictures for the report drawn as arrays, not matplotlib figures: slices of a volume through a point, a heat
map blended over them, captioned tiles in a grid, PNG bytes. Drawing a figure per Grad-CAM panel cost more
than computing the maps; arrays to PNG take milliseconds."""

from __future__ import annotations

import functools
import io

import numpy as np

TILE = 160  # pixels: a 64^3 volume's slices are scaled up (nearest) to about this size
ALPHA = 0.35  # the heat map's weight over the grey image


def views(volume: np.ndarray, at: tuple[int, int, int]) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal and sagittal slices of an (X, Y, Z) RAS volume through `at`, as a viewer shows them:
    rows run along the second axis upwards (the picture's top is its highest index)."""
    x, y, z = at
    return [(name, picture.T[::-1]) for name, picture in
            (("axial", volume[:, :, z]), ("coronal", volume[:, y, :]), ("sagittal", volume[x, :, :]))]


def blend(picture: np.ndarray, heat: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8: the picture in grey (its own minimum to maximum), a [0, 1] heat map in jet over it."""
    import matplotlib

    low, high = float(picture.min()), float(picture.max())
    grey = (picture - low) / (high - low) if high > low else np.zeros_like(picture, dtype=np.float64)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if heat is not None:
        rgb = (1 - ALPHA) * rgb + ALPHA * matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    return (rgb * 255).round().astype(np.uint8)


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def strip(width: int, text: str, height: int = 16) -> np.ndarray:
    """A white (height, width, 3) strip with `text` in black."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).text((2, 1), text, fill="black", font=_font(height - 5))
    return np.asarray(image)


def captioned(rgb: np.ndarray, text: str) -> np.ndarray:
    """The tile scaled up to about TILE pixels (nearest neighbour) under a strip with `text`."""
    k = max(1, TILE // max(rgb.shape[:2]))
    big = np.kron(rgb, np.ones((k, k, 1), dtype=np.uint8))
    return np.concatenate([strip(big.shape[1], text), big])


def grid(rows: list[list[np.ndarray]], pad: int = 4) -> np.ndarray:
    """Tiles in rows on white: each row as tall as its tallest tile, each column as wide as its widest."""
    heights = [max(t.shape[0] for t in row) + pad for row in rows]
    widths = [max(row[j].shape[1] for row in rows if j < len(row)) + pad for j in range(max(map(len, rows)))]
    out = np.full((sum(heights), sum(widths), 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            top, left = sum(heights[:i]), sum(widths[:j])
            out[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return out


def png(rgb: np.ndarray, title: str = "") -> bytes:
    """PNG bytes of an (H, W, 3) uint8 picture, with `title` above it when given."""
    from PIL import Image

    if title:
        rgb = np.concatenate([strip(rgb.shape[1], title, height=22), rgb])
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)  # the fastest zlib level
    return buf.getvalue()

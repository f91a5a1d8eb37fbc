"""Where the model looked: MONAI's Grad-CAM for a label on a volume, the report's panels (the best
epoch's top true positives and worst false positives per label, and inputs as the model saw them),
and heat maps carried back to an input's own grid for `predict saliency=true`."""

from __future__ import annotations

import numpy as np
import torch

from engine.config.schema import ModelConfig
from engine.results.report import png_bytes

# A block whose grid is fine enough to localise a nodule: a quarter of the input's (16^3 at 64^3 with the
# demo's stride-2 first conv). On the demo model ResNet's layer1 peaked within 3 voxels of a nodule in
# 9-11 of 14 validation volumes, layer2 (8^3) in 7-8, layer3 in 1-2 (a random lung voxel: 3 in 14).
TARGET_LAYERS = {"resnet3d": "layer1", "densenet3d": "features.denseblock1"}


def supports(model: ModelConfig) -> bool:
    """Grad-CAM needs a convolutional feature map: ViT's tokens have none."""
    return str(model.name) in TARGET_LAYERS


def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each map of a (B, 1, *spatial) batch scaled so its minimum is 0 and its maximum 1; a flat map is 0.
    Ours because MONAI's default normaliser maps (min, max) to (1, 0): the hottest voxel would read coldest."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1,) + (1,) * (maps.dim() - 1)
    return (maps - low.view(shape)) / span.view(shape)


def grad_cam(net: torch.nn.Module, model: ModelConfig, images: torch.Tensor, label: int) -> torch.Tensor:
    """(B, 1, *spatial) heat maps in [0, 1] for output `label`, upsampled to the input's grid, 1 where the
    evidence for the label is strongest. One MONAI GradCAM per network: each registers hooks it never
    removes, so a new one per call would pile them up."""
    from monai.visualize import GradCAM

    cam = getattr(net, "_ct3d_grad_cam", None)
    if cam is None:
        cam = GradCAM(nn_module=net, target_layers=TARGET_LAYERS[str(model.name)], postprocessing=unit_range)
        net._ct3d_grad_cam = cam
    net.eval()
    device = next(net.parameters()).device
    with torch.enable_grad():  # the input carries the graph even where every weight is frozen
        return cam(x=images.float().to(device).requires_grad_(True), class_idx=label).detach().cpu()


def peak(heat: torch.Tensor) -> tuple[int, int, int]:
    """The voxel (x, y, z) where a (1, X, Y, Z) heat map is highest; the centre for a flat map."""
    if float(heat.max()) == float(heat.min()):
        return tuple(s // 2 for s in heat.shape[1:])
    return tuple(int(i) for i in np.unravel_index(int(heat[0].argmax()), tuple(heat.shape[1:])))


def cases(probs: torch.Tensor, labels: torch.Tensor, label: int, threshold: float, positives: int = 2,
          negatives: int = 1) -> list[tuple[int, str]]:
    """(row, kind) of the highest-scoring true positives and of the negatives scored highest above the
    threshold (the worst false positives) for one label."""
    p, y = probs[:, label], labels[:, label]
    order = torch.argsort(p, descending=True).tolist()
    tp = [(i, "true positive") for i in order if y[i] == 1 and p[i] >= threshold][:positives]
    fp = [(i, "false positive") for i in order if y[i] == 0 and p[i] >= threshold][:negatives]
    return tp + fp


def _views(ax_row, image: np.ndarray, heat: np.ndarray | None, at: tuple[int, int, int], title: str) -> None:
    """Axial, coronal and sagittal slices of a (X, Y, Z) RAS volume through `at`, heat map over them."""
    x, y, z = at
    slices = [("axial", image[:, :, z], None if heat is None else heat[:, :, z]),
              ("coronal", image[:, y, :], None if heat is None else heat[:, y, :]),
              ("sagittal", image[x, :, :], None if heat is None else heat[x, :, :])]
    for ax, (view, picture, overlay) in zip(ax_row, slices):
        ax.imshow(picture.T, cmap="gray", origin="lower")
        if overlay is not None:
            ax.imshow(overlay.T, cmap="jet", alpha=0.35, origin="lower", vmin=0, vmax=1)
        ax.set_title(f"{title}: {view}", fontsize="small")
        ax.axis("off")


def report_panels(net: torch.nn.Module, model: ModelConfig, dataset, names: list[str], probs: torch.Tensor,
                  labels: torch.Tensor, thresholds: list[float], inputs: int = 4) -> list[tuple[str, bytes]]:
    """(title, PNG) panels for the report: per label, Grad-CAM through the peak for its top true positives
    and worst false positives at its threshold (rows of `probs` are `dataset` items); then inputs as the
    model saw them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if supports(model):
        for j, name in enumerate(names):
            chosen = cases(probs, labels, j, thresholds[j])
            if not chosen:
                continue
            fig, axes = plt.subplots(len(chosen), 3, figsize=(9, 3 * len(chosen)), squeeze=False)
            for row, (i, kind) in zip(axes, chosen):
                image = dataset[i]["image"].float()
                heat = grad_cam(net, model, image[None], j)[0]
                _views(row, image[0].numpy(), heat[0].numpy(), peak(heat), f"{kind} p={float(probs[i, j]):.2f}")
            fig.suptitle(f"Grad-CAM for {name} (best epoch)")
            panels.append((f"Where the model looked: {name}", png_bytes(fig, dpi=80)))
            plt.close(fig)
    count = min(inputs, len(dataset))
    fig, axes = plt.subplots(count, 3, figsize=(9, 3 * count), squeeze=False)
    for i, row in enumerate(axes):
        image = dataset[i]["image"].float()[0].numpy()
        _views(row, image, None, tuple(s // 2 for s in image.shape), f"validation volume {i}")
    fig.suptitle("Inputs as the model saw them (after preprocessing: orientation, window, size)")
    panels.append(("Inputs as the model saw them", png_bytes(fig, dpi=80)))
    plt.close(fig)
    return panels


def input_space_maps(net: torch.nn.Module, model: ModelConfig, transform, item: dict, outputs: int):
    """One Grad-CAM map per output for `item`, carried back through the preprocessing (MONAI's inverse of
    orientation, spacing and resize) to the input's own grid: (maps as (X, Y, Z, outputs), RAS affine).
    `transform` is the preprocessing made with keep_meta=True."""
    from monai.data import MetaTensor

    image = transform(dict(item))["image"]
    heats = torch.cat([grad_cam(net, model, image.as_tensor()[None], j)[0] for j in range(outputs)])
    maps = MetaTensor(heats, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    back = transform.inverse({"image": maps})["image"]
    return np.moveaxis(back.as_tensor().numpy().astype(np.float32), 0, -1), np.asarray(back.affine, dtype=np.float64)


def write_maps(path, maps: np.ndarray, affine: np.ndarray) -> None:
    """A NIfTI file (atomically) of `maps` on the grid `affine` describes (RAS, as NIfTI's are)."""
    import nibabel as nib

    from engine.utils.io import atomic_write

    with atomic_write(path) as tmp:
        nib.save(nib.Nifti1Image(maps, affine), str(tmp))

"""Where the model looked: MONAI's Grad-CAM for a label on a volume, the report's panels (the best
epoch's top true positives and worst false positives per label, and inputs as the model saw them),
and heat maps carried back to an input's own grid for `predict saliency=true`."""

from __future__ import annotations

import numpy as np
import torch

from engine.config.schema import ModelConfig
from engine.results.images import blend, captioned, grid, png, views
from engine.utils.io import atomic_write

# A block whose grid is fine enough to localise a nodule: a quarter of the input's (16^3 at 64^3 with the
# demo's stride-2 first conv). On the demo model ResNet's layer1 peaked within 3 voxels of a nodule in
# 9-11 of 14 validation volumes, layer2 (8^3) in 7-8, layer3 in 1-2 (a random lung voxel: 3 in 14).
# The pretrained encoders at their native sizes: Merlin's layer3 (14 x 14 x 20 at 224 x 224 x 160), CT-FM's
# next-to-last level (40^3 at 320^3 with its five).
TARGET_LAYERS = {"resnet3d": "layer1", "densenet3d": "features.denseblock1", "merlin": "encoder.i3_resnet.layer3",
                 "ctfm": "encoder.encoder.layers.-2.blocks"}
# Merlin's encoder sees (z, x, y) (encoders.MerlinEncoder): its maps go back to the input's (x, y, z)
MAP_AXES = {"merlin": (0, 1, 3, 4, 2)}


def supports(model: ModelConfig) -> bool:
    """Grad-CAM needs a convolutional feature map: ViT's tokens have none."""
    return str(model.name) in TARGET_LAYERS


def target_layer(net: torch.nn.Module, model: ModelConfig) -> torch.nn.Module:
    """The block whose activations Grad-CAM weighs; a negative part counts from the end of its list."""
    module = net
    for part in TARGET_LAYERS[str(model.name)].split("."):
        module = module[int(part)] if part.startswith("-") else getattr(module, part)
    return module


def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each map of a (B, 1, *spatial) batch scaled so its minimum is 0 and its maximum 1; a flat map is 0.
    Ours because MONAI's default normaliser maps (min, max) to (1, 0): the hottest voxel would read coldest."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = torch.where(high > low, high - low, torch.ones_like(high))
    shape = (-1,) + (1,) * (maps.dim() - 1)
    return (maps - low.view(shape)) / span.view(shape)


class _Stop(Exception):
    """Ends a forward pass at the target layer: nothing above it is needed for the activations."""


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively (a CUDA GPU that has it, a CPU with AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # torch's own test; private, so guarded
    return device.type == "cpu" and check is not None and bool(check())


def grad_cams(net: torch.nn.Module, model: ModelConfig, images: torch.Tensor, pairs: list[tuple[int, int]],
              chunk: int = 32, fast: bool = False, volumes_per_pass: int = 4, each: bool = True) -> torch.Tensor:
    """(P, 1, *spatial) Grad-CAM maps, one per (row of `images`, label) pair, upsampled to the input's grid, on the
    network's device: with `each`, every map scaled to [0, 1] alone (1 where its evidence is strongest, even when it is
    weak); without, as computed (ReLU of the weighted activations), so maps can be compared. The same maps as MONAI's
    GradCAM (tested), which takes one label per call and runs the whole network forward and back for it: here the target
    layer's activations of each volume are computed once, then only the layers above it run per pair, forward and back
    (no weight gradients), `chunk` pairs at a time (`volumes_per_pass` volumes at a time below the layer, where the
    full-size feature maps are: the training batch size fits). `fast`: under bfloat16 autocast where the device has it
    natively (half the time on an AVX512-BF16 CPU; a map to look at needs no more precision)."""
    layer, axes = target_layer(net, model), MAP_AXES.get(str(model.name))
    device = next(net.parameters()).device
    rows = sorted({row for row, _ in pairs})
    swap: dict = {}

    def hook(_module, _args, output):
        if "acts" in swap:  # the second pass: the pairs' activations in place of the (empty) batch's
            return swap["acts"]
        swap["kept"] = output.detach()
        raise _Stop

    handle = layer.register_forward_hook(hook)
    training, needs_grad = net.training, [p.requires_grad for p in net.parameters()]
    net.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast and native_bf16(device))
    try:
        kept = []
        with torch.no_grad(), autocast:
            for start in range(0, len(rows), volumes_per_pass):
                try:
                    net(images[rows[start:start + volumes_per_pass]].float().to(device))
                except _Stop:
                    kept.append(swap.pop("kept"))
        kept, at = torch.cat(kept) if kept else None, {row: k for k, row in enumerate(rows)}
        net.requires_grad_(False)
        maps = []
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            acts = kept[[at[row] for row, _ in part]].clone().requires_grad_(True)
            swap["acts"] = acts
            with torch.enable_grad(), autocast:
                logits = net(images[:0].float().to(device))  # no volume: the hook feeds the pairs' activations
                picked = logits[torch.arange(len(part)), torch.tensor([label for _, label in part])]
                grads, = torch.autograd.grad(picked.sum(), acts)
            weights = grads.float().flatten(2).mean(2).view(*grads.shape[:2], *[1] * (grads.dim() - 2))
            cam = torch.relu((weights * acts.detach().float()).sum(1, keepdim=True))
            cam = cam.permute(*axes) if axes else cam
            mode = "trilinear" if cam.dim() == 5 else "bilinear"
            cam = torch.nn.functional.interpolate(cam, size=images.shape[2:], mode=mode, align_corners=False)
            maps.append(unit_range(cam) if each else cam)
            del swap["acts"]
    finally:
        handle.remove()
        net.train(training)
        for p, needs in zip(net.parameters(), needs_grad):
            p.requires_grad_(needs)
    return torch.cat(maps) if maps else torch.zeros(0, 1, *images.shape[2:], device=device)


def grad_cam(net: torch.nn.Module, model: ModelConfig, images: torch.Tensor, label: int) -> torch.Tensor:
    """(B, 1, *spatial) maps for output `label` of every volume in `images`, on the CPU."""
    return grad_cams(net, model, images, [(row, label) for row in range(images.shape[0])]).cpu()


def peak(heat: torch.Tensor) -> tuple[int, int, int]:
    """The voxel (x, y, z) where a (1, X, Y, Z) heat map is highest; the centre for a flat map."""
    if float(heat.max()) == float(heat.min()):
        return tuple(s // 2 for s in heat.shape[1:])
    return tuple(int(i) for i in np.unravel_index(int(heat[0].argmax()), tuple(heat.shape[1:])))


def cases(probs: torch.Tensor, labels: torch.Tensor, label: int, threshold: float, positives: int = 1,
          negatives: int = 1) -> list[tuple[int, str]]:
    """(row, kind) of the highest-scoring true positives and of the negatives scored highest above the
    threshold (the worst false positives) for one label."""
    p, y = probs[:, label], labels[:, label]
    order = torch.argsort(p, descending=True).tolist()
    tp = [(i, "true positive") for i in order if y[i] == 1 and p[i] >= threshold][:positives]
    fp = [(i, "false positive") for i in order if y[i] == 0 and p[i] >= threshold][:negatives]
    return tp + fp


def report_panels(net: torch.nn.Module, model: ModelConfig, dataset, names: list[str], probs: torch.Tensor,
                  labels: torch.Tensor, thresholds: list[float], positives: int = 1, negatives: int = 1,
                  inputs: int = 4, volumes_per_pass: int = 4) -> list[tuple[str, bytes]]:
    """(title, PNG) panels for the report: per label, Grad-CAM through the peak for its `positives` top true
    positives and `negatives` worst false positives at its threshold (rows of `probs` are `dataset` items;
    every map in one batched pass on the network's device, each volume read once), all on one scale (the
    strongest map's peak is 1; each caption gives its map's peak); then the first `inputs` volumes as the model
    saw them."""
    panels = []
    chosen = {j: cases(probs, labels, j, thresholds[j], positives, negatives) for j in range(len(names))}
    pairs = [(i, j) for j, picked in chosen.items() for i, _ in picked] if supports(model) else []
    volumes = {i: dataset[i]["image"].float() for i in sorted({i for i, _ in pairs})}
    if pairs:
        at = {i: k for k, i in enumerate(volumes)}
        raw = grad_cams(net, model, torch.stack(list(volumes.values())), [(at[i], j) for i, j in pairs],
                        fast=True, volumes_per_pass=volumes_per_pass, each=False).cpu()
        maps = iter(raw / raw.max().clamp(min=1e-12))  # one scale for every panel: weak evidence looks weak
        for j, picked in chosen.items():
            rows = []
            for i, kind in picked:
                heat = next(maps)
                image, centre = volumes[i][0].numpy(), peak(heat)
                rows.append([captioned(blend(picture, overlay), f"{kind} p={float(probs[i, j]):.2f}, "
                                                                f"peak {float(heat.max()):.2f}: {view}")
                             for (view, picture), (_, overlay) in zip(views(image, centre), views(heat[0].numpy(),
                                                                                                   centre))])
            if rows:
                panels.append((f"Where the model looked: {names[j]}",
                               png(grid(rows), f"Grad-CAM for {names[j]} (best epoch)")))
    rows = []
    for i in range(min(inputs, len(dataset))):
        image = (volumes[i] if i in volumes else dataset[i]["image"].float())[0].numpy()
        rows.append([captioned(blend(picture), f"validation volume {i}: {view}")
                     for view, picture in views(image, tuple(s // 2 for s in image.shape))])
    panels.append(("Inputs as the model saw them",
                   png(grid(rows), "Inputs as the model saw them (after preprocessing: orientation, window, size)")))
    return panels


def input_space_maps(net: torch.nn.Module, model: ModelConfig, transform, item: dict, outputs: int):
    """One Grad-CAM map per output for `item`, scaled together (the volume's strongest map peaks at 1), carried
    back through the preprocessing (MONAI's inverse of orientation, spacing and resize) to the input's own grid:
    (maps as (X, Y, Z, outputs), RAS affine).
    `transform` is the preprocessing made with keep_meta=True."""
    from monai.data import MetaTensor

    image = transform(dict(item))["image"]
    heats = grad_cams(net, model, image.as_tensor()[None], [(0, j) for j in range(outputs)], each=False)[:, 0].cpu()
    heats = heats / heats.max().clamp(min=1e-12)  # one scale across the labels: a label without evidence stays low
    maps = MetaTensor(heats, meta=dict(image.meta), applied_operations=list(image.applied_operations))
    back = transform.inverse({"image": maps})["image"]
    return np.moveaxis(back.as_tensor().numpy().astype(np.float32), 0, -1), np.asarray(back.affine, dtype=np.float64)


def write_maps(path, maps: np.ndarray, affine: np.ndarray) -> None:
    """A NIfTI file (atomically) of `maps` on the grid `affine` describes (RAS, as NIfTI's are)."""
    import nibabel as nib

    with atomic_write(path) as tmp:
        nib.save(nib.Nifti1Image(maps, affine), str(tmp))

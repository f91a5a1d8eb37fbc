"""The closing's test-set figures: the best epoch's network scored once on the held-out test set (data.test /
data.test_fraction) with the thresholds and calibration chosen on validation, with BCa intervals: the block of
summary.json and the report to publish."""

from __future__ import annotations

import torch

from engine.config.schema import Config


def test_block(cfg: Config, net: torch.nn.Module, items: list[dict], names: list[str], task: str,
               best: dict) -> dict:
    """{"volumes", "patients", "metrics", thresholds, calibration, ECE and "bootstrap" intervals} of `net` (holding
    the best epoch's weights) on the test `items`; {} without a test set or a validation."""
    from engine.data.cache import build_dataset
    from engine.data.datalist import IMAGE, LABEL
    from engine.data.split import patient_of
    from engine.results.calibration import apply_calibration, calibration_from
    from engine.results.metrics import classification_metrics, probabilities
    from engine.results.statistics import run_statistics
    from engine.training.build import make_inferer, resolve_amp

    if not items or not best:
        return {}
    device = next(net.parameters()).device
    dataset = build_dataset(items, cfg.preprocess, cfg.cache.dir if cfg.cache.disk else None, 0.0, cfg.cache.workers)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.loader.val_batch_size or cfg.loader.batch_size)
    inferer, logits, labels = make_inferer(device, resolve_amp(cfg.train.amp, device)), [], []
    training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                logits.append(inferer(batch[IMAGE].to(device).float(), net).float().cpu())
                labels.append(batch[LABEL].float())
    finally:
        net.train(training)
    thresholds = best.get("thresholds") or [cfg.metrics.threshold] * len(names)
    calibration = calibration_from(best)
    probs = probabilities(apply_calibration(torch.cat(logits), calibration), task)
    target = torch.cat(labels)
    patients = [patient_of(it, cfg.data.patient_pattern) for it in items]
    return {"volumes": len(items), "patients": len(set(patients)),
            "metrics": classification_metrics(probs, target, names, task, thresholds, cfg.metrics.beta),
            **run_statistics(probs, target, patients, names, task, thresholds, calibration, cfg.metrics)}

"""The config sections of scoring and its experiments: metrics and intervals, the report, inference (evaluate /
predict) and sweeps. Part of the schema (schema.py imports them; engine/config/reference.py reads the comments
here too). Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from engine.config.fields import PROBABILITY, choice, setting

Mode = choice("Mode", "auto", "max", "min")
# fixed: metrics.threshold for every label; youden: max TPR - FPR; fbeta: max F-beta (both per label, on validation)
ThresholdRule = choice("ThresholdRule", "fixed", "youden", "fbeta")
Tta = choice("Tta", "none", "flips")
Pruner = choice("Pruner", "none", "median")


@dataclass
class MetricsConfig:
    # the figure that picks best.pt and drives early stopping: a name in engine/config/metric_registry.py
    # (auc_macro, auc_micro, fbeta_macro, fbeta_micro, precision, recall, specificity, accuracy, val_loss, ...)
    key: str = "auc_macro"
    mode: Mode = Mode.auto  # auto: the metric's own direction (min for val_loss and ece_macro, else max)
    threshold: float = setting(0.5, **PROBABILITY)  # the decision threshold of threshold_rule=fixed
    threshold_rule: ThresholdRule = ThresholdRule.fixed  # per-label thresholds, saved in the checkpoint
    beta: float = setting(1.0, gt=0)  # the F-beta score's beta (1: F1)
    calibrate: bool = False  # fit Platt scaling per label (a temperature for multiclass) on each validation (saved)
    bootstrap: int = setting(1000, ge=0)  # patient-level resamples for 95% intervals; 0: none
    bootstrap_seed: int = 0  # seed of the bootstrap resamples
    calibration_bins: int = setting(10, ge=2)  # equal-width bins of the reliability diagram and ECE
    # macro figures (AUC, F-beta, ECE) and their intervals average only the labels with at least this many positive
    # patients in the evaluated set; the others are listed apart, their intervals flagged unreliable (docs/statistics)
    min_positive_patients: int = setting(10, ge=1)


@dataclass
class ReportConfig:
    # report.html's Grad-CAM panels, per label: its highest-scoring true positives and worst false positives at
    # the best epoch (both 0: no panels), every map in one batched pass on the training device
    saliency_positives: int = setting(1, ge=0)
    saliency_negatives: int = setting(1, ge=0)  # see saliency_positives
    # report.png and report.html's metric panels (losses, scores, learning rate, ROC, AUC, confusion, reliability):
    # false skips drawing them (about a second of matplotlib per run on a CPU, most of a short run's closing), for
    # runs whose report nobody opens (a test suite's, a smoke check's); summary.json, metrics.csv and report.html's
    # tables are written as always
    panels: bool = True


@dataclass
class InferConfig:
    tta: Tta = Tta.none  # evaluate / predict: flips averages the identity and each axis' flip (probabilities)
    # evaluate: volumes of a patient the checkpoint's run trained on (another scan or reconstruction) are refused
    allow_trained_patients: bool = False
    # evaluate: a comparison of two checkpoints on volumes either one was selected on (its run's validation split)
    # is refused; true compares anyway, and evaluation.json records it
    allow_selection_set: bool = False
    # evaluate: a datalist without the data.patient_column the checkpoint's run grouped patients by is refused;
    # true falls back to data.patient_pattern on volume names, and evaluation.json records it
    allow_missing_patient_column: bool = False


@dataclass
class SweepConfig:
    """`sweep`: trials of Optuna over config keys; each trial is a normal run folder under
    output.dir/<output.name>/, the study a journal file there (shared by workers on several pods)."""

    # key -> {type: float|log|int, low, high} or {choices: [...]}; e.g. train.lr: {type: log, low: 1e-4, high: 1e-2}
    space: Dict[str, Any] = setting({})
    trials: int = setting(10, ge=1)  # trials in the study (failed ones are retried and do not count)
    workers: int = setting(1, ge=1)  # local worker processes (on Kubernetes: k8s.sweep_workers pods)
    metric: str = ""  # summary.json best-row key to optimise; empty: metrics.key (direction from metrics.mode)
    pruner: Pruner = Pruner.median  # median: stop a trial whose validation is below the median of earlier ones
    pruner_warmup_epochs: int = setting(2, ge=0)  # median: no trial is pruned at or before this epoch
    pruner_startup_trials: int = setting(2, ge=1)  # median: trials completed before any trial is pruned
    seed: int = 0  # seed of Optuna's sampler
    # a running trial's worker touches a file this often; a trial silent for 4 heartbeats is marked failed (its
    # worker was lost) and retried from its checkpoint
    heartbeat_seconds: float = setting(30.0, gt=0)

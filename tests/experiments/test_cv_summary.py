"""The cross-validation summary built from synthetic folds' outputs (no training): the headline is the folds' own
macro AUCs' mean, with numpy's and scipy's spread; pooling models whose logits sit apart biases the pooled AUC."""

import math
import statistics

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import f1_score, roc_auc_score

from engine.config.schema import MetricsConfig
from engine.experiments.cv_report import cv_report, headline_text
from engine.experiments.cv_summary import POOLED_NOTE, over_folds, pool, summarize, t_quantile
from engine.utils.errors import CT3DError


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 9, 12, 29])
def test_t_quantile_matches_scipy(df):
    for probability in (0.975, 0.95, 0.6):
        assert t_quantile(probability, df) == pytest.approx(stats.t.ppf(probability, df), rel=1e-9)


def test_over_folds_is_the_mean_sample_sd_and_t_interval_of_the_folds_with_a_figure():
    values = [0.81, 0.77, float("nan"), 0.86, None, 0.79]
    kept = [0.81, 0.77, 0.86, 0.79]
    got = over_folds(values)
    half = stats.t.ppf(0.975, 3) * statistics.stdev(kept) / np.sqrt(4)
    assert got["mean"] == pytest.approx(np.mean(kept)) and got["sd"] == pytest.approx(np.std(kept, ddof=1))
    assert got["interval"] == pytest.approx([np.mean(kept) - half, np.mean(kept) + half]) and got["folds"] == 4
    one = over_folds([0.8])
    assert one["mean"] == 0.8 and np.isnan(one["sd"]) and one["interval"] is None


NAMES = ["Effusion", "Nodule", "Rare", "Absent"]


def synthetic_folds(offsets: tuple[float, ...], seed: int = 0, per_fold: int = 80) -> tuple[list[dict], list[dict]]:
    """Folds of `per_fold` patients (one volume each) whose logits separate the classes alike (2 sd), fold k's
    shifted by offsets[k]; "Rare" has 2 positive patients per fold, "Absent" none. Each fold's row holds its own
    macro AUC (scikit-learn, over its labels with both classes and 10 positive patients), as summary.json would."""
    rng = np.random.default_rng(seed)
    folds, outputs = [], []
    for k, offset in enumerate(offsets):
        y = np.zeros((per_fold, 4))
        y[:, :2] = rng.uniform(size=(per_fold, 2)) < [0.35, 0.5]
        y[rng.choice(per_fold, 2, replace=False), 2] = 1
        z = 2.0 * y + rng.normal(size=y.shape) + offset
        p = 1 / (1 + np.exp(-z))
        patients = [f"P{k}_{i}" for i in range(per_fold)]
        outputs.append({"probs": torch.tensor(p), "labels": torch.tensor(y),
                        "decisions": torch.tensor(p >= 0.5).float(), "labels_names": NAMES, "task": "multilabel",
                        "patients": patients,
                        "volumes": [f"{q}_a_1.nii.gz" for q in patients]})
        aucs = [roc_auc_score(y[:, j], p[:, j]) for j in range(2)]
        folds.append({"fold": k, "run": f"fold{k}", "best_epoch": 3, "val_volumes": per_fold,
                      "auc_macro": float(np.mean(aucs)), "fbeta_macro": 0.5 + 0.1 * k,
                      "intervals": {"auc_macro": None, "fbeta_macro": None}})
    return folds, outputs


def test_pooling_fold_models_on_other_scales_lowers_auc_and_the_headline_is_the_folds_mean(tmp_path):
    folds, outputs = synthetic_folds((0.0, 0.0, 3.0))  # fold 2's model puts every logit 3 higher
    pooled = pool(outputs, "cv")
    summary = summarize(folds, pooled, MetricsConfig(bootstrap=200))
    own = [f["auc_macro"] for f in folds]
    p, y = np.concatenate([o["probs"].numpy() for o in outputs]), np.concatenate([o["labels"].numpy() for o in outputs])
    by_hand = np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(2)])
    assert summary["pooled"]["metrics"]["auc_macro"] == pytest.approx(by_hand)
    assert by_hand < min(own) - 0.05  # the bias: below every fold's own AUC
    headline = summary["headline"]["auc_macro"]
    assert headline["mean"] == pytest.approx(statistics.mean(own)) == summary["auc_macro_mean"]
    assert headline["sd"] == pytest.approx(statistics.stdev(own)) == summary["auc_macro_sd"]
    half = stats.t.ppf(0.975, len(own) - 1) * statistics.stdev(own) / np.sqrt(len(own))
    assert headline["interval"] == pytest.approx([statistics.mean(own) - half, statistics.mean(own) + half])
    f1 = [np.mean([f1_score(o["labels"][:, j], o["decisions"][:, j]) for j in range(2)]) for o in outputs]
    assert summary["headline"]["fbeta_macro"]["mean"] == pytest.approx(statistics.mean(f1))  # re-scored, not read
    assert summary["headline"]["macro_labels"] == ["Effusion", "Nodule"] and summary["headline"]["note"] == ""
    assert summary["pooled"]["note"] == POOLED_NOTE
    text = headline_text(summary)
    assert text.startswith(f"macro AUC, mean of the folds' own {statistics.mean(own):.4f}") and POOLED_NOTE in text
    page = cv_report(tmp_path, summary, pooled["probs"], pooled["labels"])
    assert page.index(f"mean of the folds' own: {statistics.mean(own):.4f}") < page.index("pooled across fold models")


def test_pooled_macro_leaves_out_one_class_and_few_positive_labels_and_flags_their_intervals(tmp_path):
    folds, outputs = synthetic_folds((0.0, 0.5, -0.5), seed=1)
    folds[0]["intervals"]["auc_macro"] = [None, None]  # a fold's NaN interval, read back from its summary.json
    pooled = pool(outputs, "cv")
    summary = summarize(folds, pooled, MetricsConfig(bootstrap=200, min_positive_patients=10))["pooled"]
    y = pooled["labels"].numpy()
    assert summary["left_out"] == {"one_class": ["Absent"], "few_positive_patients": {"Rare": 6}}  # 2 per fold
    assert summary["macro_labels"] == ["Effusion", "Nodule"] == summary["bootstrap"]["macro_labels"]
    assert {"auc/Rare", "fbeta/Rare", "auc/Absent"} <= set(summary["unreliable"]) and "auc/Nodule" not in summary[
        "unreliable"]
    assert summary["metrics"]["auc_macro"] == pytest.approx(
        np.mean([roc_auc_score(y[:, j], pooled["probs"][:, j].numpy()) for j in range(2)]))
    assert summary["bootstrap"]["few_positive_patients"] == {"Rare": 6}
    page = cv_report(tmp_path, {**summarize(folds, pooled, MetricsConfig(bootstrap=0)), "pooled": summary},
                     pooled["probs"], pooled["labels"])
    assert "one class only: Absent; under 10 positive patients: Rare (6)" in page
    assert "unreliable: 6 positive patients" in page and "<td>n/a</td>" in page
    every = summarize(folds, pooled, MetricsConfig(bootstrap=0, min_positive_patients=1))["pooled"]
    assert every["macro_labels"] == ["Effusion", "Nodule", "Rare"] and every["left_out"]["few_positive_patients"] == {}


def test_a_volume_in_two_folds_validations_is_refused():
    _, outputs = synthetic_folds((0.0, 0.0))
    outputs[1]["volumes"][0] = outputs[0]["volumes"][0]
    with pytest.raises(CT3DError, match="cv runs/x: a volume is in the validation side of two folds"):
        pool(outputs, "runs/x")


def test_the_headline_scores_every_fold_over_the_labels_all_folds_carry():
    """"Rare" has 12 positive patients in fold 0 (its own macro counts it) and 2 in the others: the headline
    re-scores every fold over Effusion and Nodule, by scikit-learn here, and says the folds differed."""
    folds, outputs = synthetic_folds((0.0, 0.0, 0.0), seed=3)
    y, rng = outputs[0]["labels"].numpy().copy(), np.random.default_rng(9)
    y[:, 2] = 0
    y[rng.choice(80, 12, replace=False), 2] = 1
    outputs[0]["labels"] = torch.tensor(y)
    folds[0]["auc_macro"] = float(np.mean([roc_auc_score(y[:, j], outputs[0]["probs"][:, j]) for j in range(3)]))
    summary = summarize(folds, pool(outputs, "cv"), MetricsConfig(bootstrap=0))
    per_fold = [np.mean([roc_auc_score(o["labels"][:, j], o["probs"][:, j]) for j in range(2)]) for o in outputs]
    assert [f["headline_auc_macro"] for f in summary["folds"]] == pytest.approx(per_fold)
    assert summary["headline"]["auc_macro"]["mean"] == pytest.approx(statistics.mean(per_fold))
    assert summary["headline"]["macro_labels"] == ["Effusion", "Nodule"]
    assert summary["headline"]["note"] == ("the folds' own macro figures average different labels (fold 0: "
                                           "Effusion, Nodule, Rare); the headline re-scores every fold over the "
                                           "labels all folds carry")
    assert summary["folds"][0]["auc_macro"] != pytest.approx(per_fold[0])  # its own figure averaged Rare in


def test_the_summary_wires_beta_decisions_patients_and_the_bootstrap_settings():
    """Two volumes per patient, decisions at 0.3 (not 0.5), beta 2: the pooled figures by scikit-learn, positive
    patients counted by hand, and every key of the summary and its headline."""
    from sklearn.metrics import fbeta_score

    from engine.experiments.cv_summary import HEADLINE, INTERVAL_METHOD
    from engine.results.statistics import bootstrap_intervals

    folds, outputs = synthetic_folds((0.0, 0.2), seed=4, per_fold=60)
    for o in outputs:
        o["patients"] = [f"{q.rsplit('_', 1)[0]}_{int(q.rsplit('_', 1)[1]) // 2}" for q in o["patients"]]
        o["decisions"] = (o["probs"] >= 0.3).float()
        y = o["labels"].numpy().copy()
        y[:, 2] = 0
        y[:6, 2] = 1  # 6 volumes of 3 patients: 3 positive patients, 6 positive volumes
        o["labels"] = torch.tensor(y)
    y0 = outputs[0]["labels"].numpy().copy()
    y0[:, 3] = 0
    y0[0, 3] = 1  # "Absent": one positive patient in all (one class in fold 1): few, not one class
    outputs[0]["labels"] = torch.tensor(y0)
    pooled = pool(outputs, "cv")
    metrics = MetricsConfig(bootstrap=150, bootstrap_seed=7, beta=2.0, min_positive_patients=7)
    summary = summarize(folds, pooled, metrics)
    out, y, d = summary["pooled"], pooled["labels"].numpy(), pooled["decisions"].numpy()
    assert out["positive_patients"] == {"Effusion": len({p for p, v in zip(pooled["patients"], y[:, 0]) if v}),
                                        "Nodule": len({p for p, v in zip(pooled["patients"], y[:, 1]) if v}),
                                        "Rare": 6, "Absent": 1}  # 3 per fold, 2 folds (12 volumes: not 7 patients)
    assert out["left_out"] == {"one_class": [], "few_positive_patients": {"Rare": 6, "Absent": 1}}
    assert {"auc/Rare", "auc/Absent"} <= set(out["unreliable"]) and "auc/Nodule" not in out["unreliable"]
    kept = out["macro_labels"]
    assert kept == ["Effusion", "Nodule"]
    expected = np.mean([fbeta_score(y[:, j], d[:, j], beta=2.0) for j in range(2)])
    for f, o in zip(summary["folds"], outputs):  # each fold over Effusion and Nodule (Rare: 4 per fold)
        yk, dk = o["labels"].numpy(), o["decisions"].numpy()
        assert f["headline_fbeta_macro"] == pytest.approx(np.mean([fbeta_score(yk[:, j], dk[:, j], beta=2.0)
                                                                   for j in range(2)]), abs=1e-6)
    assert out["metrics"]["fbeta_macro"] == pytest.approx(expected, abs=1e-6)
    again = bootstrap_intervals(pooled["probs"], pooled["labels"], pooled["decisions"], pooled["patients"],
                                NAMES, 2.0, 150, 7, min_positive=7)
    assert out["bootstrap"] == again and out["bootstrap"]["resamples"] == 150
    assert set(summary) == {"headline", "folds", "labels", "task", "auc_macro_mean", "auc_macro_sd", "pooled"}
    assert summary["task"] == "multilabel" and summary["labels"] == NAMES
    headline = summary["headline"]
    assert {k: headline[k] for k in ("figure", "what", "macro_labels")} == {
        "figure": "auc_macro", "what": HEADLINE, "macro_labels": ["Effusion", "Nodule"]}
    assert headline["note"] == ""  # Rare has 5 positive patients in each fold: out of both folds' own macro
    assert headline["auc_macro"]["interval_method"] == INTERVAL_METHOD


def test_over_folds_of_two_and_of_none():
    two = over_folds([0.8, 0.9])
    assert two["sd"] == pytest.approx(statistics.stdev([0.8, 0.9]))
    half = stats.t.ppf(0.975, 1) * two["sd"] / np.sqrt(2)
    assert two["interval"] == pytest.approx([0.85 - half, 0.85 + half])
    none = over_folds([None, float("nan")])
    assert math.isnan(none["mean"]) and math.isnan(none["sd"]) and none["interval"] is None and none["folds"] == 0

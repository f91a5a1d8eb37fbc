"""Where the macro label rule shows: the start-up refusal when it leaves no label, the closing table's notes, the
report's flags, and evaluate's checks of the run's selection set and patient column. No training: plain items,
summaries and run folders made here."""

import pytest
import yaml

from engine.config.scoring import MetricsConfig
from engine.data.items import LABEL, NAME, PATIENT
from engine.data.run_split import check_patient_column, evaluation_split_note, selection_volumes, write_split
from engine.results import tables
from engine.training.outputs import macro_keep, summary_table
from engine.utils.errors import CT3DError

NAMES = ["nodule", "effusion"]


def _items(positives: tuple[int, int], patients: int = 30) -> list[dict]:
    """One volume per patient; the first positives[c] patients positive for label c."""
    return [{NAME: f"v{i}.nii.gz", PATIENT: f"p{i}", LABEL: [float(i < positives[0]), float(i < positives[1])]}
            for i in range(patients)]


def test_the_rule_leaving_no_label_stops_the_run_naming_the_best_candidate():
    with pytest.raises(CT3DError, match=r"min_positive_patients=10: .*most: 'effusion', 7\).*=7"):
        macro_keep(_items((4, 7)), NAMES, "", MetricsConfig())
    assert macro_keep(_items((4, 12)), NAMES, "", MetricsConfig()).tolist() == [False, True]
    # not a macro key, or no label with both classes (nothing the rule took away): no refusal
    assert macro_keep(_items((4, 7)), NAMES, "", MetricsConfig(key="val_loss")).tolist() == [False, False]
    assert macro_keep(_items((0, 0)), NAMES, "", MetricsConfig()).tolist() == [False, False]
    # patients, not volumes: 12 volumes of 6 patients are 6 positive patients
    twice = [dict(it, **{PATIENT: f"p{i // 2}"}) for i, it in enumerate(_items((12, 12)))]
    with pytest.raises(CT3DError, match=r"'nodule', 6\)"):
        macro_keep(twice, NAMES, "", MetricsConfig())


def _summary(below_val: dict, below_test: dict | None) -> dict:
    best = {"epoch": 3, "auc_macro": 0.8, "auc/nodule": 0.7, "auc/effusion": 0.9}
    summary = {"best": best, "final": dict(best, epoch=4), "labels": NAMES, "below_min_positive": below_val,
               "auc_left_out": [], "min_positive_patients": 10, "auc_macro_labels": 2 - len(below_val),
               "thresholds": {n: 0.5 for n in NAMES}, "threshold_rule": "fixed",
               "calibration": {"bins": 10, "ece": {n: 0.05 for n in NAMES}, "ece_macro": 0.05,
                               "ece_interval": {n: [0.02, 0.11] for n in NAMES}, "ece_floor": {n: 0.04 for n in NAMES}}}
    if below_test is not None:
        summary["test"] = {"volumes": 40, "patients": 40, "metrics": dict(best), "below_min_positive": below_test,
                           "auc_left_out": [], "min_positive_patients": 10, "auc_macro_labels": 2 - len(below_test)}
    return summary


def test_the_closing_table_names_left_out_labels_and_different_label_sets():
    lines = summary_table(_summary({"nodule": 4}, {}), NAMES).splitlines()
    assert "validation: macro figures leave out under 10 positive patients: nodule (4)" in lines
    assert lines[-1].startswith("note: validation and test average different labels (effusion vs nodule, effusion)")
    same = summary_table(_summary({"nodule": 4}, {"nodule": 3}), NAMES)
    assert "test: macro figures leave out under 10 positive patients: nodule (3)" in same and "note:" not in same
    assert "leave out" not in summary_table(_summary({}, None), NAMES)


def test_the_report_flags_unreliable_labels_and_shows_the_ece_interval_and_floor():
    summary = _summary({"nodule": 4}, {})
    page = tables.statistics_html(summary)
    assert "nodule (4)" in page and "only 4 positive patients: out of the macro figures, interval unreliable" in page
    assert "0.0200 to 0.1100" in page and "<th>floor</th>" in page and "0.0400" in page
    test = tables.test_html(summary)
    assert "Validation and test average different labels" in test and "validation: effusion; test: nodule, effusion" \
        in test


def test_evaluate_knows_the_selection_set_and_the_patient_column(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    checkpoint = run / "checkpoints" / "best.pt"
    write_split(run, [{"volume": "a.nii.gz", "patient": "pa", "split": "train", "labels": "10"},
                      {"volume": "b.nii.gz", "patient": "pb", "split": "validation", "labels": "01"},
                      {"volume": "c.nii.gz", "patient": "pc", "split": "validation", "labels": "10"}])
    items = [{NAME: "b.nii.gz", LABEL: [0.0, 1.0]}, {NAME: "d.nii.gz", LABEL: [1.0, 0.0]}]
    assert selection_volumes(checkpoint, items) == ["b.nii.gz"]
    assert "selection set: 1 of 2 volumes" in evaluation_split_note(checkpoint, items)
    assert "selection set" not in evaluation_split_note(checkpoint, items[1:])
    assert check_patient_column(checkpoint, items, allow=False) == ""  # no config.yaml: nothing to hold it to
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"patient_column": "PatientID"}}))
    with pytest.raises(CT3DError, match=r"patient column 'PatientID'.*allow_missing_patient_column"):
        check_patient_column(checkpoint, items, allow=False)
    assert "PatientID" in check_patient_column(checkpoint, items, allow=True)
    with_ids = [dict(it, **{PATIENT: f"x{i}"}) for i, it in enumerate(items)]
    assert check_patient_column(checkpoint, with_ids, allow=False, column_now="PatientID") == ""
    with pytest.raises(CT3DError, match=r"1 of these volumes have no patient id"):  # every volume needs its id
        check_patient_column(checkpoint, [with_ids[0], items[1]], allow=False, column_now="PatientID")
    with pytest.raises(CT3DError, match=r"from the column 'MRN'"):  # ids, but not the run's kind of id
        check_patient_column(checkpoint, with_ids, allow=False, column_now="MRN")
    # another scan of a validation patient is the selection set too (patients from the pattern on the names)
    rescan = [{NAME: "pb_2.nii.gz", LABEL: [0.0, 1.0]}]
    write_split(run, [{"volume": "pb_1.nii.gz", "patient": "pb", "split": "validation", "labels": "01"}])
    assert selection_volumes(checkpoint, rescan, r"(p\w)_") == ["pb_2.nii.gz"]
    assert selection_volumes(checkpoint, rescan, "") == []


def test_validation_averages_the_labels_the_run_chose_and_its_ece_macro_too():
    """The handler's macro figures over `keep` (macro_keep's mask), against sklearn over those labels."""
    from types import SimpleNamespace

    import torch
    from sklearn.metrics import roc_auc_score

    from engine.results.calibration import expected_calibration_error
    from engine.training.handlers import ValidationMetrics

    g = torch.Generator().manual_seed(5)
    labels = (torch.rand(60, 3, generator=g) < torch.tensor([0.4, 0.5, 0.05])).float()
    logits = torch.randn(60, 3, generator=g) + 2 * labels
    keep = torch.tensor([True, False, True])
    metrics = ValidationMetrics(["a", "b", "c"], "multilabel", torch.nn.BCEWithLogitsLoss(), 0.5, 1.0, keep=keep)
    engine = SimpleNamespace(state=SimpleNamespace(output={"pred": logits, "label": labels}, metrics={}))
    metrics.reset()
    metrics.update(engine)
    metrics.compute(engine)
    aucs = [roc_auc_score(labels[:, j], logits[:, j]) for j in (0, 2)]
    assert engine.state.metrics["auc_macro"] == pytest.approx(sum(aucs) / 2, abs=1e-6)
    assert engine.state.metrics["auc_labels"] == 2
    ece = expected_calibration_error(torch.sigmoid(logits), labels)
    assert engine.state.metrics["ece_macro"] == pytest.approx((ece[0] + ece[2]) / 2, abs=1e-6)

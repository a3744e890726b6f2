"""The project-wide metrics schema: scikit-learn numbers, a validator that names problems, safe writes, figures."""
import copy, io, json
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
from nlpmt.metrics import (SCHEMA_VERSION, classification_metrics, metrics_key, metrics_record, plot_confusion,
                           read_metrics, summary_row, validate_metrics_record, write_metrics)
from nlpmt.storage import SPLITS, StoreError, save_figure, temp_store

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
REPORT = {"data_hash": "d" * 64, "splits": {s: {"sha256": s[0] * 64} for s in SPLITS}}


def _record(seed=0, n=60, **kw):
    "A real record from random predictions over the four AG News labels."
    rng = np.random.default_rng(seed)
    vt, vp, tt, tp = (rng.integers(0, 4, n).tolist() for _ in range(4))
    args = dict(fit_seconds=2.5, predict_seconds=0.25, train_rows=500, data_report=REPORT,
                config={"baseline": {"seed": 42}}, params={"C": 1.0})
    args.update(kw)
    return metrics_record("logreg", "baseline", LABELS, vt, vp, tt, tp, **args)


def test_numbers_come_from_sklearn_and_keep_absent_classes():
    y_true, y_pred = [0, 0, 1, 1, 1, 2, 2, 0], [0, 1, 1, 1, 2, 2, 0, 0]
    m = classification_metrics(y_true, y_pred, LABELS)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert m["per_class"]["Sports"] == pytest.approx({"precision": p[1], "recall": r[1], "f1": f[1], "support": 3})
    # Sci/Tech never occurs, yet keeps its row and column (the matrix is always K x K in label order)
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert m["per_class"]["Sci/Tech"]["support"] == 0
    assert classification_metrics([LABELS[i] for i in y_true], [LABELS[i] for i in y_pred], LABELS) == m


@pytest.mark.parametrize("y_true,y_pred,message", [
    (["World", "Weather"], ["World", "World"], "y_true[1]: unknown label 'Weather'"),
    ([0, 1], [0, 4], "y_pred[1]: label index 4 is outside 0..3"),
    ([0, 1, 2], [0, 1], "y_true has 3 items but y_pred has 2"),
    ([], [], "no examples to score"),
])
def test_bad_labels_are_errors_naming_the_item(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        classification_metrics(y_true, y_pred, LABELS)


def test_valid_record_has_every_schema_field_and_round_trips_through_the_store():
    rec = _record()
    assert validate_metrics_record(rec) == []
    assert rec["schema_version"] == SCHEMA_VERSION and rec["model"] == "logreg" and rec["stage"] == "baseline"
    for key in ("package_version", "git_commit", "timestamp", "python", "config"): assert rec[key]
    assert rec["data"] == {"split_hashes": {"train": "t" * 64, "val": "v" * 64, "test": "t" * 64}, "data_hash": "d" * 64}
    assert rec["train_examples_per_second"] == pytest.approx(200.0)
    assert rec["history"] == [] and rec["cost"] is None
    store = temp_store()
    key = write_metrics(store, rec)
    assert key == metrics_key("baseline", "logreg") == "results/baseline/logreg_metrics.json"
    assert read_metrics(store, key) == json.loads(json.dumps(rec))


def _broken(change):
    rec = copy.deepcopy(_record())
    change(rec)
    return validate_metrics_record(rec)


@pytest.mark.parametrize("change,expected", [
    (lambda r: r.pop("test"), "test: missing"),
    (lambda r: r.pop("git_commit"), "git_commit: missing"),
    (lambda r: r.update(fit_seconds="fast"), "fit_seconds: expected int or float, got str"),
    (lambda r: r.update(train_rows=True), "train_rows: expected int, got bool"),
    (lambda r: r["validation"].update(accuracy=1.5), "validation.accuracy: 1.5 is not in [0, 1]"),
    (lambda r: r["test"].pop("macro_f1"), "test.macro_f1: missing"),
    (lambda r: r.update(labels=LABELS[:3]), "test.confusion_matrix: expected 3x3"),
    (lambda r: r.update(labels=LABELS[:3]), "test.per_class: classes"),
    (lambda r: r["test"]["confusion_matrix"].pop(), "test.confusion_matrix: expected 4x4"),
    (lambda r: r["test"].update(n=999), "test.confusion_matrix: counts add up to 60, but n is 999"),
    (lambda r: r["predictions"]["test"]["y_pred"].reverse(), "do not reproduce test.confusion_matrix"),
    (lambda r: r["predictions"]["test"]["y_pred"].append(9), "y_true has 60 items but y_pred has 61"),
    (lambda r: r.update(stage="final"), "stage: 'final' is not one of"),
    (lambda r: r.update(model="Org/Model Name"), "model: 'Org/Model Name' is not a file-safe short name"),
    (lambda r: r["data"]["split_hashes"].pop("test"), "data.split_hashes: expected an object with keys"),
    (lambda r: r.update(history=[{"epoch": 1}]), "history[0]: missing step"),
    (lambda r: r.update(cost={"usd": 1.0}), "cost: missing instance_type"),
])
def test_malformed_records_name_their_problems(change, expected):
    problems = _broken(change)
    assert any(expected in p for p in problems), problems


def test_foreign_and_future_records_are_rejected():
    assert validate_metrics_record({"eval_accuracy": 0.9, "epoch": 3}) == \
        ["schema_version: missing (not an nlpmt metrics record?)"]
    assert validate_metrics_record({**_record(), "schema_version": 2})[0].startswith("schema_version: unknown version 2")
    assert validate_metrics_record([1, 2]) == ["record: expected a JSON object, got list"]


def test_invalid_records_are_never_written_and_bad_files_are_named():
    store = temp_store()
    rec = _record(); del rec["labels"]
    with pytest.raises(ValueError, match="labels: missing"): write_metrics(store, rec)
    assert store.list() == []
    store.write_json("results/baseline/x_metrics.json", {"accuracy": 0.9})
    with pytest.raises(StoreError, match=r"x_metrics\.json: not a valid nlpmt metrics record"):
        read_metrics(store, "results/baseline/x_metrics.json")
    with pytest.raises(ValueError, match="is invalid"):   # metrics_record validates what it builds
        _record(fit_seconds=-1.0)


def test_extra_fields_and_transformer_history_are_kept():
    hist = [{"epoch": 1.0, "step": 10, "train_loss": 0.9, "val_loss": 0.8, "val_accuracy": 0.7, "val_macro_f1": 0.6}]
    cost = {"instance_type": "ml.g5.xlarge", "billable_seconds": 600, "spot": True, "usd": 0.2}
    rec = _record(history=hist, extra={"cost": cost, "train_examples_per_second": 12.5})
    rec2 = metrics_record("sentence-transformers/all-MiniLM-L6-v2", "transformer", LABELS, [0], [0], [1], [1],
                          fit_seconds=1, predict_seconds=1, train_rows=1, data_report=REPORT, config=None)
    assert rec2["model"] == "all-minilm-l6-v2" and rec2["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert validate_metrics_record(rec) == [] and rec["cost"] == cost and rec["history"] == hist
    row = summary_row(rec)
    assert row["cost_usd"] == 0.2 and row["train_examples_per_second"] == 12.5
    assert row["test_accuracy"] == rec["test"]["accuracy"] and json.loads(row["params"]) == {"C": 1.0}


def test_confusion_figure_is_labelled_annotated_and_saves_as_png():
    rec = _record(seed=3)
    fig = plot_confusion(rec)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == LABELS
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS
    assert ax.get_xlabel() == "predicted label" and ax.get_ylabel() == "true label"
    cm = np.array(rec["test"]["confusion_matrix"])
    assert [int(t.get_text().split("\n")[0]) for t in ax.texts] == cm.ravel().tolist()
    shown = ax.images[0].get_array()                      # colours: each true class's row sums to 1
    assert np.allclose(np.asarray(shown).sum(axis=1), 1.0)
    assert "accuracy" in ax.get_title() and "logreg" in ax.get_title()
    raw = plot_confusion(rec, normalize=False).axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(raw), cm)
    store = temp_store()
    data = store.read_bytes(save_figure(store, "figures/results/logreg_confusion.png", fig))
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

"""The report stage: collecting metrics files, leaderboard, bootstrap intervals, paired tests, figures, CLI and
the sync-down-then-report round trip, on metrics files written by real baseline runs plus hand-made edge cases."""
import copy, io, json, math, contextlib
from pathlib import Path
import numpy as np
import pytest
from scipy.stats import binomtest, chi2 as chi2_dist
from sklearn.metrics import accuracy_score, f1_score

from nlpmt.cli import main
from nlpmt.core import load_config
from nlpmt.metrics import metrics_record, write_metrics, metrics_key
from nlpmt.storage import LocalStore, S3Store, sync, sync_down, temp_store, read_data_report, read_split
from nlpmt import report as R, significance as S


def _run_real_baselines(store):
    "Seed `store` with the demo data and run the real baseline stage on it."
    from nlpmt.data import prepare_demo_data
    from nlpmt.baseline import run_baseline
    config = load_config()
    prepare_demo_data(store, config=config)
    run_baseline(store, config, progress=False)


@pytest.fixture(scope="module")
def baseline_store(tmp_path_factory):
    "A store holding the demo data and the metrics of real baseline runs (built once per module)."
    store = LocalStore(tmp_path_factory.mktemp("report-base"))
    _run_real_baselines(store)
    assert len([k for k in store.list("results") if k.endswith("_metrics.json")]) >= 2
    return store


@pytest.fixture
def store(baseline_store, tmp_path):
    "A private copy of the baseline store (data + results only), so each test can add files to it."
    dst = LocalStore(tmp_path/"store")
    sync(baseline_store, dst, prefixes=("data", "results"), progress=False)
    return dst


def _real_records(store):
    "The baseline metrics records in `store`, by key."
    return {k: store.read_json(k) for k in store.list("results") if k.endswith("_metrics.json")}


def _made_record(store, model, test_pred_fn, val_pred_fn=None, data_report=None, **extra):
    "A metrics record for hand-made predictions on the store's real val/test splits."
    rep = read_data_report(store)
    labels = rep["labels"]
    val = read_split(store, "val", rep)["label"].tolist()
    test = read_split(store, "test", rep)["label"].tolist()
    val_pred = (val_pred_fn or test_pred_fn)(val, labels)
    return metrics_record(model, "baseline", labels, val, val_pred, test, test_pred_fn(test, labels),
                          fit_seconds=2.0, predict_seconds=0.1, train_rows=100, data_report=data_report or rep,
                          config={}, extra=extra or None)


def _png_size(data: bytes):
    "Width and height from a PNG header, read directly (independent of nlpmt.comparison_figures.png_size)."
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_on_real_baseline_runs(store):
    recs = _real_records(store)
    rep = R.make_report(store, n_bootstrap=300, seed=1)
    board = store.read_csv(R.SUMMARY_KEY)
    assert sorted(board["key"]) == sorted(recs)
    # ranked by validation macro-F1, never by test
    assert board["val_macro_f1"].is_monotonic_decreasing and board["rank"].tolist() == list(range(1, len(recs) + 1))
    for _, row in board.iterrows():
        rec = recs[row["key"]]
        assert row["test_accuracy"] == pytest.approx(rec["test"]["accuracy"], abs=1e-6)
        assert row["test_macro_f1_lo"] <= row["test_macro_f1"] <= row["test_macro_f1_hi"]
        assert row["test_accuracy_lo"] <= row["test_accuracy"] <= row["test_accuracy_hi"]
        assert 0 < row["test_macro_f1_hi"] - row["test_macro_f1_lo"] < 0.3
        assert row["fit_seconds"] == pytest.approx(rec["fit_seconds"], abs=1e-6)
    # one paired comparison per other model, with both tests and a verdict
    assert len(rep.comparisons) == len(recs) - 1
    assert rep.comparisons["p_bootstrap"].between(0, 1).all() and rep.comparisons["p_mcnemar_exact"].between(0, 1).all()
    md = store.read_text(R.REPORT_KEY)
    assert "validation" in md and "McNemar" in md and "Holm" in md and "## Findings" in md
    # figures: non-empty PNGs in the store with the sizes their figure functions give
    k = len(recs[board["key"][0]]["labels"])
    side = max(3.8, 1.6 + 0.75 * k)
    ncols = min(3, len(recs))
    expected = {"model_comparison": (1000, round(100 * max(2.5, 1.2 + 0.45 * len(recs)))),
                "per_class_f1": (round(100 * max(6.0, 3.0 + 1.2 * k)), round(100 * max(2.5, 1.4 + 0.5 * len(recs)))),
                "confusion_matrices": (round(100 * (side * ncols + 0.8)),
                                       round(100 * (side * math.ceil(len(recs) / ncols) + 0.4)))}
    assert sorted(rep.figures) == sorted(expected)          # baselines: no histories, no costs
    for name, size in expected.items():
        png = store.read_bytes(R.figure_key(name))
        assert len(png) > 5000 and _png_size(png) == size == rep.figure_sizes[name]
    assert any("No training curves" in n for n in rep.notes)
    assert any("No cost" in n for n in rep.notes)


def test_one_model_only_and_stale_figures_removed(store):
    for key in list(_real_records(store))[1:]: store.delete(key)
    rec = _real_records(store)
    only = next(iter(rec.values()))
    costed = {**only, "cost": {"instance_type": "ml.g5.xlarge", "billable_seconds": 300, "spot": True, "usd": 0.12}}
    store.write_json(next(iter(rec)), costed)
    rep = R.make_report(store, n_bootstrap=200)
    assert len(rep.leaderboard) == 1 and rep.comparisons.empty
    assert "cost_vs_accuracy" in rep.figures and _png_size(store.read_bytes(R.figure_key("cost_vs_accuracy"))) == (700, 450)
    assert store.read_csv(R.SUMMARY_KEY)["cost_usd"].tolist() == [0.12]
    assert "Only one model" in store.read_text(R.REPORT_KEY)
    store.write_json(next(iter(rec)), only)                  # cost gone: the old cost figure must not linger
    rep = R.make_report(store, n_bootstrap=200)
    assert "cost_vs_accuracy" not in rep.figures and not store.exists(R.figure_key("cost_vs_accuracy"))


def test_malformed_and_foreign_files_are_skipped_not_fatal(store):
    good = _real_records(store)
    store.write_text("results/baseline/halfwritten_metrics.json", '{"schema_version": 1, "model": ')
    store.write_json("results/transformer/foreign_metrics.json", {"accuracy": 0.99, "f1": 0.98})
    broken = copy.deepcopy(next(iter(good.values())))
    broken["model"] = "tampered"; broken["test"]["accuracy"] = 0.999   # numbers that its predictions do not give
    store.write_json("results/baseline/tampered_metrics.json", broken)
    rep = R.make_report(store, n_bootstrap=200)
    assert sorted(rep.leaderboard["key"]) == sorted(good)
    assert sorted(rep.skipped) == ["results/baseline/halfwritten_metrics.json", "results/baseline/tampered_metrics.json",
                                   "results/transformer/foreign_metrics.json"]
    assert "not valid JSON" in rep.skipped["results/baseline/halfwritten_metrics.json"][0]
    assert any("test.accuracy" in p for p in rep.skipped["results/baseline/tampered_metrics.json"])
    md = store.read_text(R.REPORT_KEY)
    assert "halfwritten_metrics.json" in md and "foreign_metrics.json" in md
    # nothing valid at all: a clear error naming what was skipped
    only_bad = temp_store()
    only_bad.write_text("results/baseline/x_metrics.json", "[]")
    with pytest.raises(R.ReportError, match=r"no valid metrics files.*x_metrics\.json"):
        R.make_report(only_bad)


def test_mismatched_data_hashes_refused_unless_allowed(store):
    rep = read_data_report(store)
    other = copy.deepcopy(rep)
    other["splits"]["test"]["sha256"] = "f" * 64; other["data_hash"] = "e" * 64
    rec = _made_record(store, "stale", lambda y, labels: [labels[0]] * len(y), data_report=other)   # weak: never selected
    write_metrics(store, rec)
    with pytest.raises(R.MixedDataError) as e:
        R.make_report(store, n_bootstrap=200)
    msg = str(e.value)
    assert "results/baseline/stale_metrics.json" in msg and "allow_mixed_data" in msg
    assert all(k in msg for k in _real_records(store))     # both groups named
    assert "current data" in msg                            # the group matching data_report.json is marked
    assert not store.exists(R.SUMMARY_KEY)                  # nothing half-written
    out = R.make_report(store, allow_mixed_data=True, n_bootstrap=200)
    assert out.leaderboard["data_hash"].nunique() == 2 and any("different data splits" in n for n in out.notes)
    cmp = out.comparisons.set_index("model")
    assert out.selected["model"] != "stale"
    assert "different test examples" in cmp.loc["stale", "note"] and math.isnan(cmp.loc["stale", "p_bootstrap"])
    assert cmp.drop(index="stale")["p_bootstrap"].notna().all()      # same-data pairs are still tested
    assert "data" in R.leaderboard_display(out.leaderboard).columns
    # one group again, but not the data now in the store: ranked, with a warning that the results are stale
    store.delete("results/baseline/stale_metrics.json")
    store.write_json("data/processed/data_report.json", other)
    out = R.make_report(store, n_bootstrap=200)
    assert any("differ from the store's current" in n for n in out.notes)


def test_single_class_predictor(store):
    rec = _made_record(store, "always-first", lambda y, labels: [labels[0]] * len(y))
    write_metrics(store, rec)
    rep = R.make_report(store, n_bootstrap=300)
    row = rep.leaderboard.set_index("model").loc["always-first"]
    k = len(rec["labels"])
    share = rec["test"]["per_class"][rec["labels"][0]]["support"] / rec["test"]["n"]
    assert row["test_accuracy"] == pytest.approx(share)
    assert row["test_macro_f1"] == pytest.approx(2 * share / (1 + share) / k)   # F1 of the one class, zeros elsewhere
    assert row["test_macro_f1_lo"] <= row["test_macro_f1"] <= row["test_macro_f1_hi"]
    assert row["rank"] == len(rep.leaderboard)
    cmp = rep.comparisons.set_index("model").loc["always-first"]
    assert cmp["macro_f1_verdict"] == "selected model better on macro-F1" and cmp["p_mcnemar_holm"] < 0.05
    assert "per_class_f1" in rep.figures


def test_per_class_f1_for_every_model_and_loud_warning_at_f1_zero(store, capsys):
    "A model that never predicts one class is named in a warning (report.md top, CLI stderr); every model gets a per-class row."
    def never_third(y, labels): return [labels[0] if v == labels[2] else v for v in y]
    write_metrics(store, _made_record(store, "never-third", never_third))
    rep = R.make_report(store, n_bootstrap=200)
    labels = rep.per_class.columns[1:-1].tolist()
    third = labels[2]
    assert rep.per_class["model"].tolist() == [f"{m} ({s})" for m, s in zip(rep.leaderboard["model"], rep.leaderboard["stage"])]
    assert rep.per_class.set_index("model").loc["never-third (baseline)", third] == "0.000 (F1 0!)"
    assert [w.split(" has F1 0 on the ")[1][:4] for w in rep.warnings] == ["vali", "test"]
    assert all(w.startswith(f"never-third (baseline) has F1 0") and repr(third) in w for w in rep.warnings)
    md = store.read_text(R.REPORT_KEY)
    assert md.index("> **WARNING:** never-third (baseline) has F1 0 on the test split") < md.index("## Findings")
    table = md[md.index("## Per-class F1"):md.index("## Figures")]
    assert all(f"| {m} (baseline) |" in table for m in rep.leaderboard["model"]) and "F1 0!" in table
    assert main(["report", "--store", store.uri, "--n-bootstrap", "200"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING: never-third (baseline) has F1 0 on the test split" in err and "Test F1 per class:" in out
    store.delete("results/baseline/never-third_metrics.json")
    assert R.make_report(store, n_bootstrap=200).warnings == []           # the real baselines get every class right


def test_training_curves_from_histories(store):
    hist = [{"epoch": e, "step": 20 * e, "train_loss": 1.2 / e, "val_loss": 1.0 / e + 0.1, "val_accuracy": 0.6 + 0.1 * e,
             "val_macro_f1": 0.55 + 0.1 * e} for e in (1, 2, 3)]
    rec = _made_record(store, "sentence-transformers/all-MiniLM-L6-v2", lambda y, labels: y, history=hist)
    rec["stage"] = "transformer"
    store.write_json(metrics_key("transformer", rec["model"]), rec)
    rep = R.make_report(store, n_bootstrap=200)
    assert "results/transformer/all-minilm-l6-v2_metrics.json" in set(rep.leaderboard["key"])
    assert _png_size(store.read_bytes(R.figure_key("training_curves"))) == (1200, 450)
    assert not any("No training curves" in n for n in rep.notes)


def test_mcnemar_agrees_with_direct_computation():
    # constructed 2x2 table: 40 both right, 9 only a right, 2 only b right, 9 both wrong
    y = np.zeros(60, dtype=int)
    a = np.r_[np.zeros(40), np.zeros(9), np.ones(2), np.ones(9)].astype(int)
    b = np.r_[np.zeros(40), np.ones(9), np.zeros(2), np.ones(9)].astype(int)
    got = S.mcnemar_test(y, a, b)
    assert (got["a_only_right"], got["b_only_right"]) == (9, 2)
    assert got["p_exact"] == pytest.approx(binomtest(2, 11, 0.5).pvalue, rel=1e-12)
    assert got["p_chi2"] == pytest.approx(chi2_dist.sf((9 - 2 - 1) ** 2 / 11, 1), rel=1e-12)
    assert S.mcnemar_test(y, a, a)["p_exact"] == 1.0
    big = S.mcnemar_test(np.zeros(3000, int), np.r_[np.zeros(1700), np.ones(1300)].astype(int),
                         np.r_[np.ones(1400), np.zeros(300), np.ones(1300)].astype(int))   # b=1400, c=300
    assert big["p_exact"] == pytest.approx(binomtest(300, 1700, 0.5).pvalue, rel=1e-9)


def test_bootstrap_agrees_with_direct_computation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    pa = np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300))
    pb = np.where(rng.random(300) < 0.6, y, rng.integers(0, 3, 300))
    boot = S.bootstrap_scores(y, {"a": pa, "b": pb}, 3, n_bootstrap=120, seed=5)
    idx = np.concatenate(list(S.bootstrap_indices(300, 120, 5)))
    direct = np.array([f1_score(y[i], pa[i], labels=range(3), average="macro", zero_division=0) for i in idx])
    np.testing.assert_allclose(boot["a"]["macro_f1"], direct, atol=1e-12)
    np.testing.assert_allclose(boot["b"]["accuracy"], [accuracy_score(y[i], pb[i]) for i in idx], atol=1e-12)
    # the same seed gives the same resamples, so the paired difference is computed on shared examples
    again = S.bootstrap_scores(y, {"a": pa}, 3, n_bootstrap=120, seed=5)
    np.testing.assert_array_equal(again["a"]["macro_f1"], boot["a"]["macro_f1"])
    d = S.paired_bootstrap(boot["a"]["macro_f1"], boot["b"]["macro_f1"], 0.1)
    assert d["lo"] > 0 and d["p"] == pytest.approx(2 / 121)       # a beats b on every resample
    assert S.holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_cli_report(store, capsys):
    assert main(["report", "--store", store.uri, "--n-bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard" in out and f"wrote {store.url(R.SUMMARY_KEY)}" in out
    assert all(r["model"] in out for r in _real_records(store).values())
    rec = _made_record(store, "stale", lambda y, labels: y,
                       data_report={**read_data_report(store), "splits": {s: {"sha256": s * 32} for s in ("train", "val", "test")}})
    write_metrics(store, rec)
    assert main(["report", "--store", store.uri]) == 1
    assert "stale_metrics.json" in capsys.readouterr().err
    assert main(["report", "--store", store.uri, "--allow-mixed-data", "--n-bootstrap", "200"]) == 0


@pytest.mark.aws
def test_sync_down_then_report_reproduces_cloud_report(store, s3_bucket, tmp_path, capsys):
    cloud = S3Store(f"s3://{s3_bucket}/proj")
    sync(store, cloud, prefixes=("data", "results"), progress=False)
    assert main(["report", "--store", cloud.uri, "--n-bootstrap", "300"]) == 0
    assert f"wrote {cloud.url(R.SUMMARY_KEY)}" in capsys.readouterr().out
    local = tmp_path/"local"
    sync_down(cloud, local, progress=False)
    cloud_summary = (local/"results/summary.csv").read_bytes()
    cloud_figures = {p.name: p.read_bytes() for p in (local/"figures/results").glob("*.png")}
    assert main(["report", "--store", str(local), "--n-bootstrap", "300"]) == 0
    assert (local/"results/summary.csv").read_bytes() == cloud_summary
    assert {p.name: p.read_bytes() for p in (local/"figures/results").glob("*.png")} == cloud_figures
    assert cloud.read_text(R.REPORT_KEY).replace(cloud.uri, str(local)) == (local/"results/report.md").read_text().replace(
        LocalStore(local).uri, str(local))

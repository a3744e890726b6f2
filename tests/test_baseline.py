"""The baseline stage: outputs in the store, validation-only selection, reloadable models, errors, the job notebook,
and the quality bar on the shared AG News split."""
import io, json, shutil
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from nlpmt.baseline import (SplitReader, SealedSplitError, load_pipeline, load_predictor, model_names, run_baseline,
                            save_pipeline, select_model)
from nlpmt.classifiers import CLASSIFIERS, CLASS_WEIGHTS
from nlpmt.core import BaselineConfig, BaselineModelConfig, ConfigError, load_config, sha256_bytes
from nlpmt.data import prepare_data, prepare_demo_data
from nlpmt.metrics import validate_metrics_record
from nlpmt.storage import DATA_REPORT_KEY, LocalStore, SPLITS, StoreError, read_split, temp_store

ROOT = Path(__file__).resolve().parents[1]
TEST_KEY = "data/processed/test_4class.csv"
MODELS = ("logreg", "linear_svm", "complement_nb")     # the models of configs/models_baseline.yaml


class RecordingStore(LocalStore):
    "A real local store that also notes every object it reads in a shared log."
    def __init__(self, root, log):
        super().__init__(root); self.log = log
    def read_bytes(self, key):
        self.log.append(f"store read {key}")
        return super().read_bytes(key)


def rewrite_split(store, split, df):
    "Replace a processed split and update its hash in the data report (as if the data stage had written it)."
    report = store.read_json(DATA_REPORT_KEY)
    key = report["splits"][split]["key"]
    store.write_csv(key, df)
    report["splits"][split]["sha256"] = sha256_bytes(store.read_bytes(key))
    report["data_hash"] = sha256_bytes("\n".join(f"{s}:{report['splits'][s]['sha256']}" for s in SPLITS).encode())
    store.write_json(DATA_REPORT_KEY, report)


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT/"configs")


@pytest.fixture(scope="module")
def demo_store():
    "A store seeded with the 800-row AG News demo sample through the real data stage (never modified by tests)."
    store = temp_store()
    prepare_demo_data(store, rows=800, seed=0)
    return store


@pytest.fixture(scope="module")
def baseline_run(demo_store, config):
    "All baselines run once on a copy of the demo store, recording every store read in order."
    log = []
    store = RecordingStore(temp_store().root, log)
    shutil.copytree(demo_store.root, store.root, dirs_exist_ok=True)
    return store, run_baseline(store, config, log=log, progress=False), log


def fresh_copy(store):
    copy = temp_store()
    shutil.copytree(store.root, copy.root, dirs_exist_ok=True)
    return copy


def test_run_writes_every_output(baseline_run):
    store, run, _ = baseline_run
    for model in MODELS:
        rec = store.read_json(f"results/baseline/{model}_metrics.json")
        assert validate_metrics_record(rec) == [], model
        assert rec["stage"] == "baseline" and rec["model"] == model and rec["history"] == []
        assert rec["train_rows"] == pd.read_csv(io.BytesIO(store.read_bytes("data/processed/train_4class.csv"))).shape[0]
        assert rec["fit_seconds"] > 0 and rec["predict_seconds"] > 0
        assert rec["data"]["data_hash"] == store.read_json(DATA_REPORT_KEY)["data_hash"]
        assert rec["config"]["baseline"]["seed"] == 42 and rec["git_commit"]
        assert rec["params"] in [c["params"] for c in rec["selection"]["candidates"]]
        png = store.read_bytes(f"figures/results/{model}_confusion.png")
        assert png[:4] == b"\x89PNG"
        marker = store.read_json(f"models/final/{model}/nlpmt_model.json")
        assert marker["kind"] == "baseline" and marker["model"] == model and marker["labels"] == rec["labels"]
    summary = store.read_csv("results/baseline/baseline_summary.csv")
    assert sorted(summary["model"]) == sorted(MODELS)
    assert {"test_accuracy", "test_macro_f1", "val_macro_f1", "fit_seconds", "params"} <= set(summary.columns)
    assert (summary["test_accuracy"] > 0.5).all()     # well above chance (0.25) even on the small demo sample


def test_test_split_is_read_once_and_only_after_selection(baseline_run):
    _, run, log = baseline_run
    test_reads = [i for i, e in enumerate(log) if e == f"store read {TEST_KEY}"]
    assert len(test_reads) == 1
    last_selection = max(log.index(f"selected {m}") for m in MODELS)
    assert test_reads[0] > last_selection
    assert log.index("store read data/processed/train_4class.csv") < log.index("selected logreg")
    assert log.index("store read data/processed/val_4class.csv") < log.index("selected logreg")
    assert run.log == log


def test_selection_does_not_depend_on_the_test_split(demo_store, config, baseline_run):
    "Scrambling the test labels changes test scores but not one bit of what was selected or its validation scores."
    store = fresh_copy(demo_store)
    test = read_split(store, "test")
    test["label"] = np.random.default_rng(1).permutation(test["label"].to_numpy())
    rewrite_split(store, "test", test)
    run = run_baseline(store, config, ["logreg"], progress=False)
    before, after = baseline_run[1].records["logreg"], run.records["logreg"]
    assert after["params"] == before["params"]
    assert after["validation"] == before["validation"]
    assert after["selection"]["candidates"][0]["val_macro_f1"] == before["selection"]["candidates"][0]["val_macro_f1"]
    assert after["test"]["accuracy"] < before["test"]["accuracy"] - 0.2


def test_split_reader_keeps_the_test_split_sealed(demo_store):
    reader = SplitReader(demo_store)
    reader.read("train")
    with pytest.raises(SealedSplitError, match="sealed until model selection is finished"): reader.read("test")
    reader.unseal_test()
    assert len(reader.read("test")) > 0
    with pytest.raises(SealedSplitError, match="already read"): reader.read("test")


def test_reloaded_models_predict_what_was_scored(baseline_run):
    store, run, _ = baseline_run
    test = read_split(store, "test")
    for model in MODELS:
        predictor = load_predictor(store.local_path(f"models/final/{model}"))
        rec = run.records[model]
        assert predictor.labels == rec["labels"]
        assert predictor.predict_indices(list(test["text"])).tolist() == rec["predictions"]["test"]["y_pred"]
        out = predictor.predict(["Stocks rallied after the central bank cut rates"])
        assert out[0][0] in rec["labels"] and isinstance(out[0][1], float)
    assert 0 < load_predictor(store.local_path("models/final/logreg")).predict(["goal"])[0][1] <= 1


def test_save_load_round_trip_is_exact_and_checked(demo_store, config, tmp_path):
    train, val = read_split(demo_store, "train"), read_split(demo_store, "val")
    labels = demo_store.read_json(DATA_REPORT_KEY)["labels"]
    y = lambda df: df["label"].map({l: i for i, l in enumerate(labels)}).to_numpy()
    sel = select_model("logreg", config.baseline.models["logreg"], train["text"], y(train), val["text"], y(val),
                       labels, progress=False)
    save_pipeline(sel.pipeline, tmp_path, {"model": "logreg", "model_name": "logreg", "labels": labels})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays.npz", "nlpmt_model.json", "pipeline.json"]
    loaded = load_predictor(tmp_path).pipeline
    texts = list(val["text"])
    assert np.array_equal(loaded.predict(texts), sel.pipeline.predict(texts))
    assert np.allclose(loaded.predict_proba(texts), sel.pipeline.predict_proba(texts), rtol=0, atol=1e-12)
    data = bytearray((tmp_path/"arrays.npz").read_bytes()); data[-100] ^= 1
    (tmp_path/"arrays.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"arrays\.npz: SHA-256 differs"): load_predictor(tmp_path)


def test_empty_or_blank_input_is_an_error(baseline_run):
    store = baseline_run[0]
    predictor = load_predictor(store.local_path("models/final/linear_svm"))
    with pytest.raises(ValueError, match="input is empty"): predictor.predict([])
    with pytest.raises(ValueError, match="text 2: the text is empty"): predictor.predict(["fine", "   "])
    with pytest.raises(TypeError, match="text 1: expected a string"): predictor.predict([3.5])


def test_unseen_label_in_a_split_names_file_row_and_label(demo_store, config):
    store = fresh_copy(demo_store)
    val = read_split(store, "val")
    val.loc[3, "label"] = "Weather"
    rewrite_split(store, "val", val)
    with pytest.raises(ValueError, match=r"val_4class\.csv row 5: unknown label 'Weather'"):
        run_baseline(store, config, progress=False)
    assert not store.list("results") and not store.list("models")


def test_class_without_training_rows_and_changed_split_are_errors(demo_store, config):
    store = fresh_copy(demo_store)
    train = read_split(store, "train")
    rewrite_split(store, "train", train[train["label"] != "Sports"])
    with pytest.raises(ValueError, match="no training rows of class 'Sports'"): run_baseline(store, config, progress=False)
    store = fresh_copy(demo_store)
    store.write_text("data/processed/val_4class.csv", "text,label\nhello,World\n")
    with pytest.raises(StoreError, match="SHA-256 differs"): run_baseline(store, config, progress=False)
    with pytest.raises(StoreError, match="run the data stage first"): run_baseline(temp_store(), config)


def test_model_names_and_config_errors(config):
    assert model_names("", config) == list(MODELS) == model_names([], config)
    assert model_names("linear_svm, logreg", config) == ["linear_svm", "logreg"]
    with pytest.raises(ConfigError, match="no model 'bert'"): model_names(["bert"], config)
    bad = load_config(ROOT/"configs", overrides=['baseline.models={"logreg": {"classifier": "logreg", "params": {"Cee": 1}}}'])
    with pytest.raises(ConfigError, match="models.logreg.params/search: unknown LogisticRegression parameter 'Cee'"):
        select_model("logreg", bad.baseline.models["logreg"], ["alpha beta", "gamma delta"], [0, 1], ["alpha"], [0],
                     ["x", "y"], progress=False)


def test_rerunning_one_model_keeps_the_others_in_the_summary(baseline_run, config):
    store = fresh_copy(baseline_run[0])
    run = run_baseline(store, config, ["linear_svm"], progress=False)
    assert sorted(run.summary["model"]) == sorted(MODELS)
    assert list(run.records) == ["linear_svm"]


def test_notebook_runs_as_a_papermill_job(demo_store, tmp_path):
    import papermill as pm
    store = fresh_copy(demo_store)
    out = tmp_path/"baseline_run.ipynb"
    pm.execute_notebook(str(ROOT/"nbs"/"03_baseline.ipynb"), str(out), cwd=str(tmp_path), progress_bar=False,
                        parameters={"store": str(store.root), "models": ["linear_svm"],
                                    "config_dir": str(ROOT/"configs"), "class_weight": "none"}, kernel_name="python3")
    assert store.exists("results/baseline/linear_svm_metrics.json") and not store.exists("results/baseline/logreg_metrics.json")
    rec = store.read_json("results/baseline/linear_svm_metrics.json")
    assert rec["class_weight"] == "none" == rec["config"]["baseline"]["class_weight"]     # the parameter reached the run
    nb = json.loads(out.read_text())
    kinds = [k for c in nb["cells"] for o in c.get("outputs", []) for k in o.get("data", {})]
    assert "image/png" in kinds and "text/html" in kinds     # the confusion matrix and the summary table, inline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baseline_run.ipynb"]   # nothing else written


def test_registry_is_the_one_list_of_classifiers(config):
    "Config literals, the shipped models, the estimators and the notebook all agree with nlpmt.classifiers."
    import typing
    from sklearn.feature_extraction.text import TfidfVectorizer
    hints = typing.get_type_hints(BaselineModelConfig)
    assert typing.get_args(hints["classifier"]) == tuple(CLASSIFIERS) == ("logreg", "linear_svm", "complement_nb")
    assert typing.get_args(typing.get_type_hints(BaselineConfig)["class_weight"]) == CLASS_WEIGHTS == ("none", "balanced")
    assert {m.classifier for m in config.baseline.models.values()} == set(CLASSIFIERS)   # every kind is run by default
    notebook = (ROOT/"nbs"/"00a_classifiers.ipynb").read_text()
    for name, spec in CLASSIFIERS.items():
        assert f'ClassifierSpec(\\"{name}\\"' in notebook, name          # each kind is registered in its notebook section
        params = spec.estimator_class()().get_params()
        assert set(spec.defaults) <= set(params) and set(spec.search) <= set(params), name
        assert spec.seeded == ("random_state" in params), name
        assert (spec.weighting == "param") == ("class_weight" in params), name
    for model in config.baseline.models.values():
        keys = [k for k in (model.search or {}) if not k.startswith("tfidf.")]
        assert set(keys) <= set(CLASSIFIERS[model.classifier].estimator_class()().get_params())
        assert {k[6:] for k in (model.search or {}) if k.startswith("tfidf.")} <= set(TfidfVectorizer().get_params())
    with pytest.raises(ConfigError, match=r"'naive_bayes' is not one of \['logreg', 'linear_svm', 'complement_nb'\]"):
        load_config(ROOT/"configs", overrides=['baseline.models={"nb": {"classifier": "naive_bayes"}}'])
    with pytest.raises(ConfigError, match=r"class_weight: 'auto' is not one of \['none', 'balanced'\]"):
        load_config(ROOT/"configs", overrides=["baseline.class_weight=auto"])


TOY = (["goal match team win", "team coach league", "stock market shares", "bank profit market",
        "chip laptop battery", "software chip cloud"] * 6, [0, 0, 1, 1, 2, 2] * 6, ["sport", "money", "tech"])


@pytest.mark.parametrize("kind", list(CLASSIFIERS))
@pytest.mark.parametrize("class_weight", CLASS_WEIGHTS)
def test_every_registered_classifier_saves_and_loads_exactly(kind, class_weight, tmp_path):
    "The model format stores each kind's registry-listed arrays (no `coef_` assumed) and reloads the same scores."
    texts, y, labels = TOY
    sel = select_model(kind, BaselineModelConfig(kind, tfidf={"ngram_range": [1, 2]}), texts, y, texts[:6], y[:6],
                       labels, progress=False, class_weight=class_weight)
    assert len(sel.candidates) == len(next(iter(CLASSIFIERS[kind].search.values())))   # the registry's grid
    save_pipeline(sel.pipeline, tmp_path, {"model": kind, "model_name": kind, "labels": labels})
    with np.load(tmp_path/"arrays.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(["tfidf.idf_", "clf.classes_", *(f"clf.{a}" for a in CLASSIFIERS[kind].fitted)])
    loaded = load_predictor(tmp_path)
    probe = ["league goal win", "market bank", "cloud chip", "unknown words only"]
    assert np.array_equal(loaded.predict_indices(probe), sel.pipeline.predict(probe))
    score = "predict_proba" if loaded.score_kind == "probability" else "decision_function"
    assert np.allclose(getattr(loaded.pipeline, score)(probe), getattr(sel.pipeline, score)(probe), rtol=0, atol=1e-12)
    assert json.loads((tmp_path/"pipeline.json").read_text())["classifier"] == kind


def test_models_saved_in_the_first_format_still_load(tmp_path):
    "A folder in the first format (nlpmt-tfidf-linear-v1: idf/coef/intercept/classes arrays) loads and predicts the same."
    texts, y, labels = TOY
    sel = select_model("logreg", BaselineModelConfig("logreg", search={}), texts, y, texts[:6], y[:6], labels,
                       progress=False)
    save_pipeline(sel.pipeline, tmp_path, {"model": "logreg", "model_name": "logreg", "labels": labels})
    with np.load(tmp_path/"arrays.npz") as npz: arrays = {k: npz[k] for k in npz.files}
    np.savez(tmp_path/"arrays.npz", idf=arrays["tfidf.idf_"], coef=arrays["clf.coef_"],
             intercept=arrays["clf.intercept_"], classes=arrays["clf.classes_"])
    doc = json.loads((tmp_path/"pipeline.json").read_text()); doc["format"] = "nlpmt-tfidf-linear-v1"
    (tmp_path/"pipeline.json").write_text(json.dumps(doc))
    marker = json.loads((tmp_path/"nlpmt_model.json").read_text())
    marker["format"] = "nlpmt-tfidf-linear-v1"
    marker["files"] = {f: sha256_bytes((tmp_path/f).read_bytes()) for f in ("pipeline.json", "arrays.npz")}
    (tmp_path/"nlpmt_model.json").write_text(json.dumps(marker))
    pipeline, _ = load_pipeline(tmp_path)
    assert np.allclose(pipeline.predict_proba(texts), sel.pipeline.predict_proba(texts), rtol=0, atol=1e-12)
    marker["format"] = "pickle-v0"; (tmp_path/"nlpmt_model.json").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="format 'pickle-v0' is not 'nlpmt-tfidf-v2'"): load_pipeline(tmp_path)


def skewed_store(demo_store, minority="Business", keep=8):
    "A copy of the demo store whose training split keeps only `keep` rows of one class (about 2 % of it)."
    store = fresh_copy(demo_store)
    train = read_split(store, "train")
    rows = train[train["label"] == minority].index[keep:]
    rewrite_split(store, "train", train.drop(rows).reset_index(drop=True))
    return store


def test_class_weight_balanced_lifts_the_minority_class(demo_store, config):
    "On a training split with one class cut to ~2 %, balanced weights raise that class's validation recall for every kind."
    store = skewed_store(demo_store)
    report = store.read_json(DATA_REPORT_KEY)
    labels = report["labels"]
    train, val = read_split(store, "train"), read_split(store, "val")
    y = lambda df: df["label"].map({l: i for i, l in enumerate(labels)}).to_numpy()
    assert (y(train) == labels.index("Business")).mean() < 0.03
    recall = {}
    for kind in CLASSIFIERS:
        for cw in CLASS_WEIGHTS:
            sel = select_model(kind, BaselineModelConfig(kind, search={}), train["text"], y(train), val["text"], y(val),
                               labels, progress=False, class_weight=cw)
            minority = y(val) == labels.index("Business")
            recall[kind, cw] = float((sel.val_pred[minority] == labels.index("Business")).mean())
    print(recall)
    assert all(recall[k, "balanced"] >= recall[k, "none"] for k in CLASSIFIERS), recall
    assert sum(recall[k, "balanced"] - recall[k, "none"] for k in CLASSIFIERS) > 0.3, recall
    run = run_baseline(store, load_config(ROOT/"configs", overrides=["baseline.class_weight=none"]), ["linear_svm"],
                       progress=False)
    assert run.records["linear_svm"]["class_weight"] == "none"
    marker_params = json.loads(Path(store.local_path("models/final/linear_svm/pipeline.json")).read_text())["clf_params"]
    assert marker_params["class_weight"] is None
    assert config.baseline.class_weight == "balanced"


@pytest.mark.slow
def test_quality_bar_on_the_shared_ag_news_split(ag_news_dir, config):
    "Both models reach test accuracy >= 0.87 on the data stage's AG News split (data config defaults)."
    store = temp_store()
    report = prepare_data(config, store, progress=False)
    assert report["rows_read"] == 7600
    run = run_baseline(store, config, progress=False)
    scores = {m: round(r["test"]["accuracy"], 4) for m, r in run.records.items()}
    print("AG News test accuracy:", scores)
    assert all(acc >= 0.87 for acc in scores.values()), scores

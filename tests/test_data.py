"""The data stage on real AG News, on a corpus of deliberately broken raw files (tests/data/), through S3 (moto),
through a local HTTP server standing in for the AG News download, and as a papermill job."""
import functools, hashlib, http.server, io, json, os, shutil, threading
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from nlpmt.core import DataConfig, load_config, sha256_bytes
from nlpmt.storage import (DATA_REPORT_KEY, SPLITS, LocalStore, S3Store, read_data_report, read_split, split_hashes,
                           split_key)
import nlpmt.data as data
import nlpmt.formats as formats
from nlpmt.data import DataError, prepare_data, prepare_demo_data

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT/"tests"/"data"
LABELS3 = ["Tech", "Food", "Travel"]


def cfg(name: str, **kw) -> DataConfig:
    "A data config for a fixture file with a `text,label` header (override anything with kw)."
    base = dict(raw_path=str(FIX/name), csv_header=True, columns=None, text_fields=["text"], label_field="label",
                label_names=None, label_names_file=None, label_index_base=0, val_frac=0.1, test_frac=0.2, seed=42)
    return DataConfig(**{**base, **kw})


def run(config, store=None, **kw) -> dict:
    "Run the stage quietly into `store` (default: a fresh temporary one)."
    return prepare_data(config, store if store is not None else data.temp_store(), progress=False, **kw)


def check_outputs(store, report) -> None:
    "The written splits match the report: hashes, data hash, counts, no overlap, row accounting."
    assert report["rows_read"] == report["rows_kept"] + sum(report["dropped"].values())
    assert read_data_report(store) == json.loads(json.dumps(report, default=str))
    shas = {}
    frames = {s: read_split(store, s, report) for s in SPLITS}
    for s in SPLITS:
        blob = store.read_bytes(split_key(s, report["n_classes"]))
        shas[s] = hashlib.sha256(blob).hexdigest()
        assert shas[s] == report["splits"][s]["sha256"]
        assert list(frames[s].columns) == ["text", "label"]
        assert frames[s].label.value_counts().to_dict() == {k: v for k, v in report["splits"][s]["class_counts"].items() if v}
        assert set(frames[s].label) <= set(report["labels"])
    assert report["data_hash"] == hashlib.sha256(f"train:{shas['train']}\nval:{shas['val']}\ntest:{shas['test']}".encode()).hexdigest()
    assert sum(len(f) for f in frames.values()) == report["rows_kept"]
    keys = {s: set(data.normalise_texts(f.text)) for s, f in frames.items()}
    assert not (keys["train"] & keys["val"]) and not (keys["train"] & keys["test"]) and not (keys["val"] & keys["test"])
    for key in report["figures"].values(): assert store.read_bytes(key)[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- real AG News
def test_ag_news_real_run(ag_news_dir, tmp_path):
    store = LocalStore(tmp_path/"store")
    report = run(load_config(), store)
    check_outputs(store, report)
    assert report["labels"] == ["World", "Sports", "Business", "Sci/Tech"] and report["n_classes"] == 4
    assert report["rows_read"] == 7600 and report["source"]["format"] == "csv"
    assert report["source"]["sha256"] == sha256_bytes((ag_news_dir/"test.csv").read_bytes())
    for s, frac in [("train", 0.7), ("val", 0.1), ("test", 0.2)]:
        counts = list(report["splits"][s]["class_counts"].values())
        assert max(counts) - min(counts) <= 1, counts                      # the 4 balanced classes survive
        assert abs(report["splits"][s]["rows"] / report["rows_kept"] - frac) < 0.005
    assert report["leakage"] == {"checked": True, "overlapping_texts": 0, "pairs": {"train/val": 0, "train/test": 0, "val/test": 0}}
    assert report["config"]["label_names"] == report["labels"] and report["provenance"]["package_version"]


def test_fast_and_exact_csv_parsers_agree(ag_news_dir):
    raw = (ag_news_dir/"test.csv").read_bytes()
    names, needed = ["label", "title", "description"], ["title", "description", "label"]
    fast = formats.parse_delimited_fast(raw, names, False, needed, ",", "csv")
    exact = formats.parse_delimited_exact(raw, names, False, needed, ",", "csv")
    assert fast is not None and len(fast) == 7600
    pd.testing.assert_frame_equal(fast[["line", *needed]], exact[["line", *needed]], check_dtype=False)


def test_same_inputs_and_seed_give_byte_identical_outputs(ag_news_dir, tmp_path):
    stores = [LocalStore(tmp_path/n) for n in ("a", "b", "c")]
    reports = [run(load_config(), stores[0]), run(load_config(), stores[1]), run(load_config(), stores[2], seed=7)]
    for s in SPLITS:
        key = split_key(s, 4)
        assert stores[0].read_bytes(key) == stores[1].read_bytes(key)
    assert reports[0]["data_hash"] == reports[1]["data_hash"] != reports[2]["data_hash"]
    strip = lambda r: {k: v for k, v in r.items() if k != "provenance"}
    assert strip(reports[0]) == strip(reports[1])
    assert stores[0].read_bytes(split_key("train", 4)) != stores[2].read_bytes(split_key("train", 4))


# ---------------------------------------------------------------- input formats
@pytest.mark.parametrize("name,kw,labels", [
    ("raw_data.json", {}, ["Food", "Tech", "Travel"]),                                       # JSON array, names inferred
    ("multi_field.jsonl", dict(text_fields=["title", "body"], label_names=LABELS3), LABELS3),  # 0-based int labels
    ("headerless.csv", dict(csv_header=False, columns=["label", "title", "body"], text_fields=["title", "body"],
                            label_names=LABELS3, label_index_base=1), LABELS3),
    ("ag_layout/news.csv", dict(csv_header=False), LABELS3),                                   # classes.txt beside it
])
def test_input_formats(name, kw, labels):
    store = data.temp_store()
    report = run(cfg(name, **kw), store)
    check_outputs(store, report)
    assert report["labels"] == labels and report["rows_read"] == report["rows_kept"] == 36
    train = read_split(store, "train", report)
    assert train.text.str.match(r"^(Tech|Food|Travel) story \d+:? the ").all()   # title + body joined with a space
    assert all(t.split()[0] == l for t, l in zip(train.text, train.label))         # label indices mapped correctly


def test_store_key_input_and_label_file_in_store():
    store = data.temp_store()
    store.write_bytes("data/raw/news.csv", (FIX/"headerless.csv").read_bytes())
    store.write_text("data/raw/classes.txt", "Tech\nFood\nTravel\n")
    report = run(cfg("x", raw_path="data/raw/news.csv", csv_header=False, columns=["label", "title", "body"],
                     text_fields=["title", "body"], label_names_file="data/raw/classes.txt", label_index_base=1), store)
    assert report["source"]["path"] == "data/raw/news.csv" and report["labels"] == LABELS3
    check_outputs(store, report)


# ---------------------------------------------------------------- broken files: lenient drops, strict errors
BROKEN = [  # file, extra config, rows_read, dropped (non-zero reasons), strict error
    ("empty_text.csv", {}, 38, {"empty_text": 2},
     "empty_text.csv: line 7: empty text: the fields ['text'] are blank (and 1 more bad row; strict=False drops and counts them)"),
    ("missing_text.jsonl", {}, 38, {"missing_text": 2},
     "missing_text.jsonl: line 6: missing text: none of the fields ['text'] is present (and 1 more bad row;"),
    ("missing_label.csv", {}, 38, {"missing_label": 2},
     "missing_label.csv: line 7: missing label: field 'label' is absent or blank"),
    ("unknown_label.csv", dict(label_names=LABELS3), 39, {"unknown_label": 3},
     "unknown_label.csv: line 7: unknown label 'Sports': not one of the 3 labels ['Tech', 'Food', 'Travel'] (and 2 more bad rows;"),
    ("undecodable.csv", {}, 38, {"undecodable_bytes": 2},
     "undecodable.csv: line 7: undecodable bytes: byte 0xe9 is not valid UTF-8"),
    ("malformed.csv", {}, 38, {"malformed_csv": 2},
     "malformed.csv: line 7: malformed CSV record: expected 2 fields, found 3"),
    ("malformed.jsonl", {}, 38, {"malformed_json": 2},
     "malformed.jsonl: line 6: malformed JSON: Expecting ',' delimiter (column 41)"),
    ("duplicates.csv", {}, 41, {"duplicate_exact": 3, "duplicate_normalised": 2}, None),   # dedup is never an error
    ("conflicting.csv", {}, 41, {"conflicting_labels": 5},
     "conflicting.csv: line 7 and line 8: the same text has different labels ('Tech' vs 'Food'): 'Shared headline about a new chip'"),
    ("small_class.csv", {}, 40, {"class_too_small": 4},
     "small_class.csv: class 'Rare' has 4 rows after cleaning; at least 10 are needed to stratify train/val/test (min_class_rows=10)"),
]

@pytest.mark.parametrize("name,kw,rows_read,dropped,error", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_lenient_drops_and_counts(name, kw, rows_read, dropped, error):
    store = data.temp_store()
    report = run(cfg(name, **kw), store)
    assert report["rows_read"] == rows_read
    assert {k: v for k, v in report["dropped"].items() if v} == dropped
    assert set(report["dropped"]) == set(data.REASONS)
    assert report["rows_kept"] == 36 and report["labels"] == (kw.get("label_names") or ["Food", "Tech", "Travel"])
    check_outputs(store, report)


@pytest.mark.parametrize("name,kw,rows_read,dropped,error", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_file_strict_error_names_file_line_and_problem(name, kw, rows_read, dropped, error):
    store = data.temp_store()
    if error is None:
        assert run(cfg(name, strict=True, **kw), store)["rows_kept"] == 36
        return
    with pytest.raises(DataError) as e: run(cfg(name, strict=True, **kw), store)
    assert str(e.value).startswith(str(FIX/error.split(":")[0])) and error in str(e.value)
    assert store.list("data/processed") == [] and store.list("figures") == []   # nothing written


def test_strict_line_numbers_count_physical_lines(tmp_path):
    "A BOM, a quoted line break and a blank line before the bad row: the error still names its physical line."
    items = json.loads((FIX/"raw_data.json").read_text())
    row = lambda r: f'"{r["text"]}",{r["label"]}'
    lines = ["text,label", *map(row, items[:3]), '"a Tech story\nover two lines about chips",Tech', "",
             *map(row, items[3:10]), '"  ",Food', *map(row, items[10:])]
    path = tmp_path/"odd.csv"; path.write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())
    report = run(cfg("x", raw_path=str(path)))
    assert (report["rows_read"], report["rows_kept"], report["dropped"]["empty_text"]) == (38, 37, 1)
    with pytest.raises(DataError, match=r"odd\.csv: line 15: empty text"): run(cfg("x", raw_path=str(path), strict=True))


def test_undecodable_bytes_in_json_lines_and_json_arrays(tmp_path):
    items = json.loads((FIX/"raw_data.json").read_text())
    lines = [json.dumps(r).encode() for r in items]
    lines.insert(5, b'{"text": "caf\xe9 story", "label": "Food"}')
    (tmp_path/"bad.jsonl").write_bytes(b"\n".join(lines))
    assert run(cfg("x", raw_path=str(tmp_path/"bad.jsonl")))["dropped"]["undecodable_bytes"] == 1
    with pytest.raises(DataError, match=r"bad\.jsonl: line 6: undecodable bytes: byte 0xe9 at column 14 is not valid UTF-8"):
        run(cfg("x", raw_path=str(tmp_path/"bad.jsonl"), strict=True))
    array = json.dumps(items).encode().replace(b"Tech story 3:", b"Tech story 3 \xff:")
    (tmp_path/"bad.json").write_bytes(array)
    assert run(cfg("x", raw_path=str(tmp_path/"bad.json")))["dropped"]["undecodable_bytes"] == 1
    with pytest.raises(DataError, match=r"bad\.json: item 10: undecodable bytes: byte 0xff is not valid UTF-8"):
        run(cfg("x", raw_path=str(tmp_path/"bad.json"), strict=True))


@pytest.mark.parametrize("config,error", [
    (cfg("nope.csv"), "nope.csv: raw data file not found"),
    (cfg("empty.csv"), "empty.csv: file is empty"),
    (cfg("header_only.csv"), "header_only.csv: no records found"),
    (cfg("single_class.csv"), "single_class.csv: only 1 class ('Tech') has usable rows; a classifier needs at least two"),
    (cfg("single_class.csv", strict=True), "only 1 class ('Tech') has usable rows"),
    (cfg("malformed_array.json"), "malformed_array.json: line 14 column 18: malformed JSON (Expecting ',' delimiter)"),
    (cfg("headerless.csv", csv_header=False), "headerless.csv: column 'text' not found; the columns are ['column_1', "
                                              "'column_2', 'column_3'] (the file has no header row: name its columns with `columns`"),
    (cfg("empty_text.csv", text_fields=["body"]), "empty_text.csv: column 'body' not found; the columns are ['text', 'label']"),
    (cfg("unknown_label.csv", label_names=["Nope", "Never"]), "unknown_label.csv: no usable rows: all 39 records are bad ({'unknown_label': 39})"),
    (cfg("x", raw_path="data/raw/missing.csv"), "data/raw/missing.csv: raw data file not found in the store"),
], ids=lambda v: v.raw_path.rsplit("/", 1)[-1] if isinstance(v, DataConfig) else None)
def test_unusable_inputs_are_clear_errors_in_both_modes(config, error):
    store = data.temp_store()
    with pytest.raises(DataError, match=None) as e: run(config, store)
    assert error in str(e.value)
    assert store.list() == []


def test_bad_fractions_are_a_config_error():
    with pytest.raises(data.ConfigError, match="val_frac=0.5 and test_frac=0.5"): run(cfg("raw_data.json", val_frac=0.5, test_frac=0.5))


def test_failed_run_leaves_previous_outputs_untouched():
    store = data.temp_store()
    first = run(cfg("raw_data.json"), store)
    before = {k: store.read_bytes(k) for k in store.list()}
    with pytest.raises(DataError): run(cfg("conflicting.csv", strict=True), store)
    with pytest.raises(DataError): run(cfg("single_class.csv"), store)
    assert {k: store.read_bytes(k) for k in store.list()} == before and read_data_report(store)["data_hash"] == first["data_hash"]


def test_leakage_check_fails_the_run_when_texts_cross_splits(monkeypatch):
    "Fault injection: with deduplication switched off, repeated texts land in two splits and the guard must stop the run."
    monkeypatch.setattr(data, "find_duplicates", lambda text, *args: pd.Series([None] * len(text), index=text.index, dtype=object))
    store = data.temp_store()
    with pytest.raises(DataError, match=r"leakage check failed: \{'train/val': \d+, 'train/test': \d+, 'val/test': \d+\}"):
        run(cfg("duplicates.csv", val_frac=0.3, test_frac=0.3), store)
    assert store.list() == []
    assert data.check_leakage({"train": pd.Series(["A b"]), "val": pd.Series(["x"]), "test": pd.Series(["a, B"])})["overlapping_texts"] == 1


# ---------------------------------------------------------------- S3 input and S3 store (moto server)
@pytest.mark.aws
def test_raw_input_from_s3_and_outputs_to_s3_store(s3_bucket):
    s3 = S3Store(f"s3://{s3_bucket}")
    s3.write_bytes("incoming/news.jsonl", (FIX/"malformed.jsonl").read_bytes())
    s3.write_text("incoming/classes.txt", "Tech\nFood\nTravel\n")
    store = S3Store(f"s3://{s3_bucket}/project")
    report = run(cfg("x", raw_path=f"s3://{s3_bucket}/incoming/news.jsonl", label_names_file=f"s3://{s3_bucket}/incoming/classes.txt"), store)
    assert report["source"] == {"path": f"s3://{s3_bucket}/incoming/news.jsonl", "format": "jsonl",
                                "sha256": sha256_bytes((FIX/"malformed.jsonl").read_bytes()), "bytes": (FIX/"malformed.jsonl").stat().st_size,
                                "label_names_file": f"s3://{s3_bucket}/incoming/classes.txt", "compression": None, "encoding": "utf-8"}
    assert report["labels"] == LABELS3 and report["dropped"]["malformed_json"] == 2
    check_outputs(store, report)
    assert sorted(store.list("data/processed")) == [DATA_REPORT_KEY] + sorted(split_key(s, 3) for s in SPLITS)
    with pytest.raises(DataError, match=f"s3://{s3_bucket}/incoming/missing.csv: raw data file not found"):
        run(cfg("x", raw_path=f"s3://{s3_bucket}/incoming/missing.csv"), store)


# ---------------------------------------------------------------- AG News download (local HTTP server)
@pytest.fixture
def ag_news_server(tmp_path, ag_news_dir):
    "A local HTTP server with a 400-row AG News-style train.csv and classes.txt; yields (base URL, request log)."
    site = tmp_path/"site"; site.mkdir()
    lines = (ag_news_dir/"test.csv").read_bytes().splitlines(keepends=True)
    (site/"train.csv").write_bytes(b"".join(lines[:400]))
    shutil.copy(ag_news_dir/"classes.txt", site/"classes.txt")
    requests = []
    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): requests.append(self.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True); thread.start()
    try: yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally: server.shutdown(); server.server_close()


def test_ag_news_downloads_when_there_is_no_local_copy(ag_news_server, tmp_path, monkeypatch):
    site_root, requests = ag_news_server
    monkeypatch.setenv("NLPMT_AG_NEWS_DIR", str(tmp_path/"no_local_copy"))
    assert data.AG_NEWS_URL == "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv"
    store = data.temp_store()
    report = run(cfg("x", raw_path="ag_news://train"), store, ag_news_url=site_root)
    assert report["source"]["path"] == "data/raw/ag_news/train.csv" and report["labels"] == data.AG_NEWS_LABELS
    assert report["rows_read"] == 400 and store.exists("data/raw/ag_news/classes.txt")
    check_outputs(store, report)
    n = len(requests)
    run(cfg("x", raw_path="ag_news://train"), store, ag_news_url=site_root)   # second run: the store's copy
    assert len(requests) == n == 2
    with pytest.raises(DataError, match=r"could not download http://127\.0\.0\.1:\d+/missing/test\.csv: HTTP Error 404"):
        data.download_ag_news(data.temp_store(), ("test",), site_root + "/missing", progress=False)


def test_ag_news_prefers_the_local_copy(ag_news_dir, monkeypatch):
    monkeypatch.setenv("NLPMT_AG_NEWS_DIR", str(ag_news_dir))
    store = data.temp_store()
    report = run(cfg("x", raw_path="ag_news://test"), store, ag_news_url="http://127.0.0.1:9/unreachable")
    assert report["source"]["path"] == str(ag_news_dir/"test.csv") and report["rows_read"] == 7600
    assert not store.exists("data/raw/ag_news/test.csv")


# ---------------------------------------------------------------- demo data
def test_demo_data_is_a_stratified_ag_news_sample(ag_news_dir):
    store = data.temp_store()
    report = prepare_demo_data(store, rows=800, seed=0)
    check_outputs(store, report)
    assert report["demo"]["source"] == "sample" and report["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert report["rows_read"] == 800 and all(c == 200 for c in
        pd.DataFrame({s: report["splits"][s]["class_counts"] for s in SPLITS}).sum(axis=1))
    assert prepare_demo_data(data.temp_store(), rows=800, seed=0)["data_hash"] == report["data_hash"]


def test_demo_data_synthesises_a_corpus_without_ag_news(tmp_path):
    shutil.copytree(ROOT/"configs", tmp_path/"configs")
    cfg_file = tmp_path/"configs"/"datasets"/"ag_news.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("../shared/data/ag_news/", "missing/"))
    store = data.temp_store()
    report = prepare_demo_data(store, rows=400, seed=3, config=load_config(tmp_path/"configs"))
    assert report["demo"]["source"] == "synthetic" and report["n_classes"] == 4 and report["rows_kept"] == 400
    check_outputs(store, report)


# ---------------------------------------------------------------- the notebook as a papermill job
def test_notebook_runs_as_a_papermill_job(tmp_path, monkeypatch):
    import papermill as pm
    monkeypatch.setenv("NLPMT_ROOT", str(ROOT))
    store_dir = tmp_path/"store"
    out = tmp_path/"executed"/"02_data.ipynb"; out.parent.mkdir()
    params = dict(store=str(store_dir), raw_path=str(FIX/"duplicates.csv"), csv_header=True, text_fields=["text"],
                  label_field="label", label_names=LABELS3, val_frac=0.2, test_frac=0.2, seed=5, strict=False)
    pm.execute_notebook(str(ROOT/"nbs"/"02_data.ipynb"), str(out), parameters=params, cwd=str(tmp_path),
                        kernel_name="python3", progress_bar=False)
    store = LocalStore(store_dir)
    report = read_data_report(store)
    check_outputs(store, report)
    assert report["labels"] == LABELS3 and report["dropped"]["duplicate_exact"] == 3 and report["config"]["seed"] == 5
    nb = json.loads(out.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2                 # figures shown inline
    assert any(str(store_dir) in "".join(o.get("text", "")) for o in outputs)          # prints where outputs went
    assert not list((ROOT/"nbs").glob("*.png")) and not (tmp_path/"figures").exists()

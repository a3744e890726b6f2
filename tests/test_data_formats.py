"""The raw-format registry end to end through the data stage: TSV, Parquet, label folders, compressed and re-encoded
files; bad input in each new shape (a named error, the store untouched); and the weak data-input points of issue 11
(capped messages, loud drop summaries, NUL bytes, unterminated quotes, header detection, min_class_rows)."""
import gzip, io, json, zipfile
from pathlib import Path
import pandas as pd
import pytest
from nlpmt.core import ConfigError, DataConfig
from nlpmt.storage import LocalStore, read_split
import nlpmt.data as data
import nlpmt.formats as formats
from nlpmt.data import DataError, prepare_data

LABELS = ["Tech", "Food", "Travel"]
WORDS = {"Tech": "chip software", "Food": "bakery recipe", "Travel": "airline hotel"}


def rows(n_per_class: int = 12, labels=LABELS) -> list[dict]:
    "Distinct texts, `n_per_class` per label."
    return [{"text": f"{l} story {i}: the {WORDS.get(l, 'misc')} news of day {i}", "label": l} for l in labels for i in range(n_per_class)]


def run(raw_path, store=None, **kw) -> dict:
    "The data stage on `raw_path` alone (no profile applies), quietly, into `store` (default: a new temporary one)."
    return prepare_data(DataConfig(raw_path=str(raw_path), **kw), store if store is not None else data.temp_store(), progress=False)


def seeded_store(tmp_path) -> LocalStore:
    "A store holding the outputs of an earlier good run (to prove a failed run leaves them untouched)."
    good = tmp_path/"good.jsonl"; good.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    store = LocalStore(tmp_path/"store"); run(good, store)
    return store


def snapshot(store) -> dict:
    return {k: store.read_bytes(k) for k in store.list("")}


# ---------------------------------------------------------------- new shapes, fields guessed from raw_path alone
def test_tsv_with_raw_quotes_and_a_header_is_read_from_raw_path_alone(tmp_path):
    f = tmp_path/"q.tsv"
    f.write_text("question\tintent\n" + "".join(f'say "{r["text"]}\t{r["label"]}\n' for r in rows()))
    report = run(f)
    assert report["source"]["format"] == "tsv" and report["rows_kept"] == 36 and sorted(report["labels"]) == sorted(LABELS)
    assert report["dataset"] == {"profile": None, "file": None, "fields": [],
                                 "guessed": {"csv_header": True, "text_fields": ["question"], "label_field": "intent"}}


def test_parquet_is_one_registry_entry_with_typed_columns(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    df = pd.DataFrame(rows()); df["label"] = df.label.map({l: i for i, l in enumerate(LABELS)})   # integer labels
    pq.write_table(pa.Table.from_pandas(df.rename(columns={"text": "review", "label": "stars"})), tmp_path/"r.parquet")
    store = data.temp_store()
    report = run(tmp_path/"r.parquet", store)
    assert report["source"]["format"] == "parquet" and report["labels"] == ["0", "1", "2"] and report["rows_kept"] == 36
    assert "parquet" in formats.FORMATS and formats.FORMATS["parquet"].extensions == (".parquet", ".pq")
    train = read_split(store, "train", report)
    assert all(t.split()[0] == LABELS[int(l)] for t, l in zip(train.text, train.label))


def test_folder_of_label_subfolders(tmp_path):
    for r in rows():
        d = tmp_path/"corpus"/r["label"]; d.mkdir(parents=True, exist_ok=True)
        (d/f"{abs(hash(r['text'])) % 10**8}.txt").write_text(r["text"] + "\n")
    (tmp_path/"corpus"/".DS_Store").write_text("x")                                    # hidden files are skipped
    report = run(tmp_path/"corpus")
    assert report["source"]["format"] == "folder" and sorted(report["labels"]) == sorted(LABELS) and report["rows_kept"] == 36


@pytest.mark.parametrize("pack", ["gzip", "zip", "utf16"])
def test_compressed_and_utf16_files_are_read_transparently(tmp_path, pack):
    text = "text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows())
    if pack == "gzip": f = tmp_path/"news.csv.gz"; f.write_bytes(gzip.compress(text.encode()))
    elif pack == "utf16": f = tmp_path/"news.csv"; f.write_bytes(text.encode("utf-16"))
    else:
        f = tmp_path/"news.zip"; buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z: z.writestr("inner/news.csv", text)
        f.write_bytes(buf.getvalue())
    report = run(f)
    assert report["rows_kept"] == 36 and report["source"]["format"] == "csv"
    assert report["source"]["compression"] == {"gzip": "gzip", "zip": "zip", "utf16": None}[pack]
    assert report["source"]["encoding"] == ("utf-16-le (BOM)" if pack == "utf16" else "utf-8")


# ---------------------------------------------------------------- bad input in the new shapes: named error, store untouched
def _bad_inputs(tmp_path) -> dict:
    import pyarrow as pa, pyarrow.parquet as pq
    (tmp_path/"empty_dir").mkdir()
    (tmp_path/"no_files"/"pos").mkdir(parents=True); (tmp_path/"no_files"/"neg").mkdir()
    (tmp_path/"no_files"/"pos"/"a.txt").write_text("good")
    pq.write_table(pa.table({"review": ["x"], "stars": [1]}), tmp_path/"nofield.parquet")
    (tmp_path/"blob.bin").write_bytes(bytes([0, 1, 2, 3, 0, 0, 5, 7]) * 500)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z: z.writestr("a.csv", "x"); z.writestr("b.csv", "y")
    (tmp_path/"two.zip").write_bytes(buf.getvalue())
    return {"empty_dir": ({}, "empty_dir: empty folder: expected one subfolder per label"),
            "no_files": ({}, "no_files: label folder 'neg' has no files"),
            "nofield.parquet": ({"text_fields": ["text"], "label_field": "stars"},
                                "nofield.parquet: column 'text' not found; the columns are ['review', 'stars']"),
            "blob.bin": ({}, "blob.bin: looks binary, not text: 38% of its first 4,000 bytes are NUL"),
            "two.zip": ({}, "two.zip: zip archive with 2 files ('a.csv', 'b.csv'); unzip it")}

@pytest.mark.parametrize("name", ["empty_dir", "no_files", "nofield.parquet", "blob.bin", "two.zip"])
def test_bad_new_shapes_are_named_errors_and_leave_the_store_untouched(tmp_path, name):
    store = seeded_store(tmp_path)
    before = snapshot(store)
    kw, message = _bad_inputs(tmp_path)[name]
    for strict in (False, True):
        with pytest.raises(DataError) as e: run(tmp_path/name, store, strict=strict, **kw)
        assert str(e.value).startswith(str(tmp_path/name)) and message in str(e.value)
    assert snapshot(store) == before


def test_non_utf8_txt_in_a_folder_is_a_bad_record_named_by_its_file(tmp_path):
    for r in rows():
        d = tmp_path/"c"/r["label"]; d.mkdir(parents=True, exist_ok=True)
        (d/f"{r['text'][-2:].strip()}_{len(list(d.iterdir()))}.txt").write_text(r["text"])
    (tmp_path/"c"/"Food"/"zz_latin1.txt").write_bytes("caf\xe9 cr\xe8me news".encode("latin-1"))
    report = run(tmp_path/"c")
    assert report["dropped"]["undecodable_bytes"] == 1 and report["rows_kept"] == 36
    store = seeded_store(tmp_path); before = snapshot(store)
    with pytest.raises(DataError, match=r"c: file Food/zz_latin1.txt: undecodable bytes: byte 0xe9 at offset 3"):
        run(tmp_path/"c", store, strict=True)
    assert snapshot(store) == before


# ---------------------------------------------------------------- issue 11: weak data-input points
def test_a_5mb_single_line_file_does_not_put_its_header_in_the_error(tmp_path):
    f = tmp_path/"one_line.csv"; f.write_text("x" * 5_000_000)
    for header in (True, None):   # the one line as a header row; or detected as no header
        with pytest.raises(DataError) as e: run(f, text_fields=["text"], label_field="label", csv_header=header)
        assert len(str(e.value)) < 400 and "column 'text' not found" in str(e.value)
        assert ("xxxx'... (262,144 characters)" if header else "['column_1']") in str(e.value)


def test_lenient_drops_are_summarised_and_vanishing_classes_warned_loudly(tmp_path, capsys):
    recs = rows(30) + [{"text": f"rare item {i} with its own words", "label": "rare"} for i in range(2)]
    recs = [dict(r, label=r["label"].lower()) if r["label"] == "Travel" and i % 5 < 3 else r for i, r in enumerate(recs)]
    f = tmp_path/"case.jsonl"; f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report = run(f, label_names=["Tech", "Food", "Travel", "rare"])
    out, err = capsys.readouterr()
    assert report["dropped"]["unknown_label"] == 18 and report["dropped"]["class_too_small"] == 2
    assert "nlpmt data: kept 72 of 92 rows; dropped: unknown_label 18, class_too_small 2" in out
    assert "WARNING: 20 of 92 rows (21.7%) were dropped" in err
    assert "WARNING: 1 class(es) vanished, no rows left: 'rare'" in err
    assert "WARNING: 18 rows have a label that differs from a known label only in case" in err
    assert len(report["warnings"]) == 3


def test_only_one_class_error_mentions_the_undecodable_rows(tmp_path):
    body = "".join(f"Tech story {i} about chips,Tech\n" for i in range(20)).encode()
    body += b"".join(b"Caf\xe9 story %d about food,Food\n" % i for i in range(30))
    f = tmp_path/"latin.csv"; f.write_bytes(b"text,label\n" + body)
    with pytest.raises(DataError, match=r"only 1 class \('Tech'\) has usable rows; a classifier needs at least two "
                                        r"\(30 rows were dropped before that: undecodable_bytes 30"):
        run(f)


def test_nul_bytes_are_flagged_and_not_kept(tmp_path, capsys):
    recs = rows(); recs[0]["text"] = "Tech story\x00 with a NUL"
    f = tmp_path/"nul.jsonl"; f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    store = data.temp_store()
    report = run(f, store)
    assert "1 rows had NUL bytes in their text" in capsys.readouterr().err and any("NUL" in w for w in report["warnings"])
    assert not any(b"\x00" in store.read_bytes(report["splits"][s]["key"]) for s in report["splits"])


def test_an_unterminated_quote_swallowing_lines_is_flagged(tmp_path):
    lines = [f"{r['label']},{r['text']}" for r in rows(20)]
    lines[5] = lines[5].replace(",", ',"', 1)                     # opens a quote that closes nowhere sensible
    lines[9] = lines[9] + '"'
    f = tmp_path/"quote.csv"; f.write_text("label,text\n" + "\n".join(lines) + "\n")
    report = run(f)
    assert report["dropped"]["malformed_csv"] == 1 and (report["rows_read"], report["rows_kept"]) == (56, 55)
    with pytest.raises(DataError, match=r"quote.csv: line 7: malformed CSV record: a quoted value runs from line 7 to line 11 "
                                        r"and swallows 4 line\(s\) that look like records of their own: unterminated quote\?"):
        run(f, strict=True)


def test_a_csv_header_is_detected_when_nothing_says(tmp_path):
    f = tmp_path/"h.csv"; f.write_text("label,text\n" + "".join(f"{r['label']},{r['text']}\n" for r in rows()))
    report = run(f)
    assert report["dataset"]["guessed"]["csv_header"] is True and report["rows_read"] == 36
    g = tmp_path/"noh.csv"; g.write_text("".join(f"{r['label']},{r['text']}\n" for r in rows()))
    report = run(g)
    assert report["dataset"]["guessed"] == {"csv_header": False, "text_fields": ["column_2"], "label_field": "column_1"}


def test_negative_min_class_rows_is_an_error_not_clamped(tmp_path):
    with pytest.raises(ConfigError, match="data.min_class_rows: -5 is negative"):
        run(tmp_path/"x.csv", min_class_rows=-5)


def test_imbalance_is_flagged_in_the_report_and_the_figure(tmp_path):
    recs = rows(40, ["Tech", "Food"]) + rows(10, ["Travel"])
    f = tmp_path/"skew.jsonl"; f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    store = data.temp_store()
    report = run(f, store)
    assert report["imbalance"] == {"ratio": 4.0, "largest": "Food", "smallest": "Travel", "flagged": True}
    assert any("imbalanced" in w for w in report["warnings"])
    fig = data.plot_class_distribution(report)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "imbalance ratio 4 (imbalanced)" in texts


# ---------------------------------------------------------------- one registry
def test_the_format_registry_is_the_one_list_of_formats():
    from nlpmt.cli import build_parser
    names = formats.format_names()
    assert names == ["auto", "csv", "tsv", "jsonl", "json", "parquet", "folder"]
    parser = build_parser(["data", "inspect", "x"])
    sub = next(a for a in parser._actions if a.dest == "command").choices["data"]
    inspect = next(a for a in sub._actions if a.dest == "data_command").choices["inspect"]
    assert next(a for a in inspect._actions if a.dest == "format").choices == names          # CLI choices
    nb = json.loads((Path(data.__file__).parents[1]/"nbs"/"02_data.ipynb").read_text())
    params = next("".join(c["source"]) for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    line = next(l for l in params.splitlines() if l.startswith("raw_format"))
    assert set(line.split("#", 1)[1].split(";")[0].replace("|", " ").split()) == set(names)    # the notebook's parameter
    for f in formats.FORMATS.values():                                                          # extensions select formats
        for ext in f.extensions: assert formats.detect_format(formats.RawInput("x" + ext, "x" + ext, b"a,b\n")) == f.name
    with pytest.raises(ConfigError, match=r"data.raw_format: 'xlsx' is not one of \['auto', 'csv'"):
        run("x.xlsx", raw_format="xlsx")


def test_undecodable_rows_get_an_encoding_hint(capsys):
    report = run(Path(__file__).parent/"data"/"undecodable.csv")
    assert report["dropped"]["undecodable_bytes"] == 2
    assert "Windows-1252/Latin-1 file: `iconv -f cp1252 -t utf-8`" in capsys.readouterr().err

"""`nlpmt predict`: any saved model (baseline or transformer), from a folder, a local store or S3, with clear errors."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
from nlpmt.baseline import load_predictor as load_baseline, run_baseline
from nlpmt.cli import main
from nlpmt.core import load_config
from nlpmt.data import prepare_demo_data
from nlpmt.predict import available_models, load_model, predict_texts, read_texts
from nlpmt.storage import S3Store, sync, temp_store

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Oil prices climb as the dollar slips", "The home side won the derby with a late goal",
         "New chip promises longer battery life for laptops"]


@pytest.fixture(scope="module")
def store():
    "A store with the demo data and both baseline models."
    store = temp_store()
    prepare_demo_data(store, rows=400, seed=0)
    run_baseline(store, load_config(ROOT/"configs"), progress=False)
    return store


def run_cli(*args, capsys):
    rc = main(["predict", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_store_and_name_print_label_and_score_per_text(store, capsys):
    rc, out, err = run_cli("--model", str(store.root), "--name", "logreg", *TEXTS, capsys=capsys)
    assert rc == 0, err
    lines = out.strip().split("\n")
    expected = load_baseline(store.local_path("models/final/logreg")).predict(TEXTS)
    assert [tuple(l.split("\t")[:2]) for l in lines] == [(lab, f"{s:.4f}") for lab, s in expected]
    assert [l.split("\t")[2] for l in lines] == TEXTS


def test_model_folder_json_output_and_file_input(store, tmp_path, capsys):
    texts_file = tmp_path/"texts.txt"
    texts_file.write_text(TEXTS[0] + "\n\n" + TEXTS[1] + "\n")
    folder = store.local_path("models/final/linear_svm")
    rc, out, err = run_cli("--model", str(folder), "--file", str(texts_file), TEXTS[2], "--json", capsys=capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["model"] == "linear_svm" and result["kind"] == "baseline" and result["score"] == "margin"
    assert [p["text"] for p in result["predictions"]] == [TEXTS[2], TEXTS[0], TEXTS[1]]
    expected = load_baseline(folder).predict([TEXTS[2], TEXTS[0], TEXTS[1]])
    assert [(p["label"], p["score"]) for p in result["predictions"]] == [(l, pytest.approx(s)) for l, s in expected]


def test_console_script_in_a_subprocess(store):
    exe = Path(sys.executable).parent/"nlpmt"
    proc = subprocess.run([str(exe), "predict", "--model", str(store.root), "--name", "logreg", "--json", TEXTS[1]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pred = json.loads(proc.stdout)["predictions"][0]
    assert pred["label"] in store.read_json("data/processed/data_report.json")["labels"] and 0 < pred["score"] <= 1
    proc = subprocess.run([str(exe), "predict", "--model", str(store.root), "--name", "logreg"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "nlpmt: error: no texts to predict" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/folder", "x"], "/no/such/folder: no such folder"),
    (["--name", "bert", "x"], "no saved model named 'bert' (no nlpmt_model.json); models in this store: complement_nb, linear_svm, logreg"),
    (["x"], "holds several models (complement_nb, linear_svm, logreg): choose one with --name"),
    (["--name", "logreg"], "no texts to predict: give texts as arguments or --file FILE"),
    (["--name", "logreg", "ok", ""], "text argument 2 is empty"),
    (["--name", "logreg", "--file", "/no/file.txt"], "/no/file.txt: no such file"),
])
def test_errors_are_clear_and_exit_non_zero(store, args, message, capsys):
    if "--model" not in args: args = ["--model", str(store.root), *args]
    rc, out, err = run_cli(*args, capsys=capsys)
    assert rc == 1 and out == ""
    assert f"nlpmt: error: " in err and message in err, err


def test_empty_store_folder_and_empty_file(tmp_path, capsys):
    (tmp_path/"empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt: no texts \(the file is empty\)"):
        read_texts([], str(tmp_path/"empty.txt"))
    rc, _, err = run_cli("--model", str(tmp_path), "x", capsys=capsys)
    assert rc == 1 and "no nlpmt_model.json here and no models under models/final/" in err
    with pytest.raises(ValueError, match="input is empty"): predict_texts(str(tmp_path), [])


def test_unknown_kind_and_broken_marker_are_named(store, tmp_path):
    folder = tmp_path/"m"
    shutil.copytree(store.local_path("models/final/logreg"), folder)
    marker = json.loads((folder/"nlpmt_model.json").read_text())
    (folder/"nlpmt_model.json").write_text(json.dumps({**marker, "kind": "quantum"}))
    with pytest.raises(ValueError, match=r"nlpmt_model\.json: unknown model kind 'quantum' \(known: baseline, transformer\)"):
        load_model(folder)
    (folder/"nlpmt_model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"nlpmt_model\.json: not valid JSON"): load_model(folder)


def test_single_model_store_needs_no_name(store):
    single = temp_store()
    sync(store, single, prefixes=["models/final/linear_svm"], progress=False)
    assert available_models(single) == ["linear_svm"]
    result = predict_texts(str(single.root), TEXTS[:1])
    assert result["model"] == "linear_svm"


def make_transformer_folder(root: Path) -> Path:
    "A tiny random BERT classifier saved per the saved-model contract (marker with its file manifest)."
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    from nlpmt.model_integrity import seal_model_folder
    words = sorted({w for t in TEXTS for w in t.lower().split()})
    root.mkdir(parents=True, exist_ok=True)
    (root/"vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root/"vocab.txt"))
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=4,
                     id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    folder = root/"models"/"final"/"tiny-bert"
    BertForSequenceClassification(cfg).save_pretrained(folder); tokenizer.save_pretrained(folder)
    (folder/"nlpmt_model.json").write_text(json.dumps({"kind": "transformer", "model": "tiny-bert",
                                                       "model_name": "tiny-bert", "labels": labels, "max_length": 64,
                                                       "created": "2025-01-01T00:00:00+00:00"}))
    seal_model_folder(folder)
    return folder


def test_transformer_models_dispatch_to_the_transformer_loader(tmp_path, capsys):
    "A tiny random BERT classifier saved per the saved-model contract is loaded by nlpmt.transformer."
    make_transformer_folder(tmp_path)
    rc, out, err = run_cli("--model", str(tmp_path), "--name", "tiny-bert", "--json", *TEXTS, capsys=capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["kind"] == "transformer" and len(result["predictions"]) == 3
    assert all(p["label"] in ["World", "Sports", "Business", "Sci/Tech"] and 0 < p["score"] <= 1
               for p in result["predictions"])


def _flip_bytes(path: Path, at: int = 4096, n: int = 64) -> None:
    "Overwrite `n` bytes in the middle of a file (a corrupt download or disk)."
    data = bytearray(path.read_bytes())
    at = min(at, len(data) - n)
    data[at:at + n] = bytes(255 - b for b in data[at:at + n])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f/"tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda f: _flip_bytes(f/"model.safetensors"), "model.safetensors: SHA-256 differs"),
    (lambda f: (f/"config.json").write_text((f/"config.json").read_text().replace('"Sports"', '"Politics"')),
     "config.json: SHA-256 differs"),
    (lambda f: (f/"nlpmt_model.json").write_text(json.dumps({k: v for k, v in json.loads(
        (f/"nlpmt_model.json").read_text()).items() if k != "files"})), "no file manifest"),
])
def test_damaged_transformer_folder_is_an_error_naming_the_file(tmp_path, capsys, damage, message):
    "Missing tokenizer, corrupt weights, a changed file or no manifest: exit 1 and the file named, no predictions."
    folder = make_transformer_folder(tmp_path)
    damage(folder)
    rc, out, err = run_cli("--model", str(folder), *TEXTS, capsys=capsys)
    assert rc == 1 and out == "", out
    assert message in err and str(folder) in err, err


def test_corrupt_weights_with_a_matching_manifest_still_name_the_file(tmp_path, capsys):
    "Weights that are unreadable although the manifest was rewritten to match: the load error names the file."
    from nlpmt.model_integrity import seal_model_folder
    folder = make_transformer_folder(tmp_path)
    (folder/"model.safetensors").write_bytes(b"\x00" * 100)
    seal_model_folder(folder)
    rc, out, err = run_cli("--model", str(folder), *TEXTS, capsys=capsys)
    assert rc == 1 and out == ""
    assert f"{folder/'model.safetensors'}: cannot load the model" in err, err


@pytest.mark.aws
def test_models_in_s3_are_downloaded_and_predict_the_same(store, s3_bucket, capsys):
    s3 = S3Store(f"s3://{s3_bucket}/proj")
    sync(store, s3, prefixes=["models"], progress=False)
    local = predict_texts(str(store.root), TEXTS, name="logreg")
    assert predict_texts(s3.uri, TEXTS, name="logreg")["predictions"] == local["predictions"]
    rc, out, err = run_cli("--model", f"{s3.uri}/models/final/logreg", "--json", *TEXTS, capsys=capsys)
    assert rc == 0, err
    assert json.loads(out)["predictions"] == local["predictions"]
    rc, _, err = run_cli("--model", s3.uri, "--name", "nope", "x", capsys=capsys)
    assert rc == 1 and "no saved model named 'nope'" in err


def test_a_gpu_fp16_model_predicts_on_a_cpu(tmp_path):
    "A model validated in fp16 on a GPU is read on a CPU in what runs there (not refused for lack of CUDA)."
    from nlpmt.model_integrity import seal_model_folder
    from nlpmt.transformer import load_predictor
    folder = make_transformer_folder(tmp_path)
    marker = json.loads((folder/"nlpmt_model.json").read_text())
    (folder/"nlpmt_model.json").write_text(json.dumps({**marker, "precision": "fp16"}))
    seal_model_folder(folder)
    predictor = load_predictor(folder)
    assert predictor.precision in ("bf16", "fp32") and len(predictor.predict(TEXTS)) == 3

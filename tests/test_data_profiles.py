"""Dataset profiles, field guessing and `nlpmt data inspect`; and the README's "Your own data" commands, run as
written (real local jobs) on small files the test makes."""
import json, os, re, shlex, shutil, subprocess, sys
from pathlib import Path
import pytest
import yaml
from nlpmt.cli import main
from nlpmt.core import ConfigError, DataConfig, load_config
from nlpmt.storage import LocalStore, read_data_report
import nlpmt.data as data
from nlpmt.data import DataError, prepare_data

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["billing", "outage", "sales"]


def write_own_data(root: Path) -> None:
    "The README's example files: a JSONL with text/label, a CSV with other column names, a folder of label subfolders."
    d = root/"my_data"; d.mkdir(parents=True)
    with open(d/"reviews.jsonl", "w") as f:
        for i in range(45):
            f.write(json.dumps({"id": i, "text": f"review {i}: the {['plot', 'acting', 'music'][i % 3]} was {'good' if i % 2 else 'bad'} "
                                f"and number {i} says so", "label": ["pos", "neg", "mixed"][i % 3]}) + "\n")
    rows = [f"{i},Ticket {i} about {q},Customer {i} writes about the {q} problem on day {i},{q},{['low', 'high', 'mid'][i % 3]}"
            for i in range(60) for q in [LABELS[i % 3]]]
    (d/"tickets.csv").write_text("id,subject,body,queue,priority\n" + "\n".join(rows) + "\n")
    for i in range(36):
        label = LABELS[i % 3]
        (d/"articles"/label).mkdir(parents=True, exist_ok=True)
        (d/"articles"/label/f"{i:03d}.txt").write_text(f"Article {i} on {label}: a longer document about {label} number {i}.\n")


def readme_commands() -> list[str]:
    "The `nlpmt ...` lines of the README's 'Your own data' section, comments removed."
    readme = (ROOT/"README.md").read_text()
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.startswith("nlpmt ")]


@pytest.mark.slow
def test_readme_own_data_commands_run_as_written(tmp_path):
    shutil.copytree(ROOT/"configs", tmp_path/"configs")
    (tmp_path/"nbs").symlink_to(ROOT/"nbs")
    write_own_data(tmp_path)
    env = {**os.environ, "NLPMT_ROOT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("NLPMT_STORE", None)
    nlpmt = shutil.which("nlpmt", path=str(Path(sys.executable).parent)) or "nlpmt"
    commands = readme_commands()
    assert len(commands) == 6 and sum(c.startswith("nlpmt run data") for c in commands) == 4
    store = LocalStore(tmp_path/"store")
    for cmd in commands:
        proc = subprocess.run([nlpmt, *shlex.split(cmd)[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if cmd.startswith("nlpmt data inspect my_data/reviews.jsonl"):
            assert "text fields: ['text'] (guessed); label field: 'label' (guessed)" in proc.stdout
            assert "all-minilm-l6-v2 tokens" in proc.stdout and "nlpmt run data -p raw_path my_data/reviews.jsonl" in proc.stdout
        if cmd.startswith("nlpmt run data"):
            report = read_data_report(store)
            want = {"reviews": ["mixed", "neg", "pos"]}.get(next((k for k in ("reviews",) if k in cmd), ""), LABELS)
            assert report["labels"] == want and report["dataset"]["profile"] == ("tickets" if "--dataset" in cmd else None)
            assert report["source"]["path"].startswith(str(tmp_path/"my_data"))
            assert report["source"]["format"] == ("jsonl" if "reviews" in cmd else "folder" if "articles" in cmd else "csv")
    profile = yaml.safe_load((tmp_path/"configs"/"datasets"/"tickets.yaml").read_text())
    assert profile["raw_path"] == "my_data/tickets.csv" and profile["text_fields"] == ["subject", "body"]
    report = read_data_report(store)
    assert report["config"]["text_fields"] == ["subject", "body"] and report["config"]["label_field"] == "queue"


def test_an_ambiguous_guess_lists_the_fields_and_the_flags(tmp_path):
    write_own_data(tmp_path)
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(raw_path=str(tmp_path/"my_data"/"tickets.csv")), data.temp_store(), progress=False)
    msg = str(e.value)
    assert "tickets.csv: cannot tell which field holds the label (candidates: 'queue', 'priority')" in msg
    assert "  subject: 100% filled, 60 distinct" in msg and "-p label_field FIELD" in msg and "--write-profile NAME" in msg


def test_a_raw_path_alone_takes_nothing_from_the_default_profile(tmp_path, ag_news_dir):
    write_own_data(tmp_path)
    report = prepare_data(load_config(), data.temp_store(), progress=False, raw_path=str(tmp_path/"my_data"/"reviews.jsonl"))
    assert report["dataset"]["profile"] is None and report["labels"] == ["mixed", "neg", "pos"]
    cfg = report["config"]
    assert (cfg["label_names_file"], cfg["columns"], cfg["label_index_base"], cfg["text_fields"]) == (None, None, 0, ["text"])
    ag = prepare_data(load_config(), data.temp_store(), progress=False)                   # no arguments: AG News
    assert ag["dataset"]["profile"] == "ag_news" and ag["dataset"]["file"] == str(ROOT/"configs"/"datasets"/"ag_news.yaml")



def test_a_headerless_csv_with_classes_txt_beside_it_reads_in_the_ag_news_layout(tmp_path):
    "A raw_path to an AG-News-shaped CSV plus label_names_file (as a SageMaker job passes them) needs no text_fields."
    folder = tmp_path/"raw"; folder.mkdir()
    rows = [f'{1 + i % 3},"title {i} {w}","description {i} about {w} things"' for i in range(90) for w in [("world", "sport", "money")[i % 3]]]
    (folder/"news.csv").write_text("\n".join(rows) + "\n")
    (folder/"classes.txt").write_text("World\nSports\nBusiness\n")
    report = prepare_data(load_config(), data.temp_store(), progress=False, raw_path=str(folder/"news.csv"),
                          label_names_file=str(folder/"classes.txt"), text_fields=None)
    assert set(report["labels"]) == {"World", "Sports", "Business"}
    assert report["config"]["text_fields"] == ["title", "description"]

def test_dataset_by_name_by_file_and_unknown(tmp_path):
    write_own_data(tmp_path)
    prof = tmp_path/"reviews.yaml"
    prof.write_text(yaml.safe_dump({"raw_path": str(tmp_path/"my_data"/"reviews.jsonl"), "text_fields": ["text"],
                                    "label_field": "label", "label_names": ["neg", "pos", "mixed"]}))
    report = prepare_data(load_config(overrides=[f"data.dataset={prof}"]), data.temp_store(), progress=False)
    assert report["labels"] == ["neg", "pos", "mixed"] and report["dataset"]["file"] == str(prof)
    with pytest.raises(ConfigError, match=r"dataset 'nope': no profile .*nope.yaml; the profiles are \['ag_news'\]"):
        prepare_data(load_config(overrides=["data.dataset=nope"]), data.temp_store(), progress=False)
    prof.write_text("raw_path: x.csv\ntext_feilds: [a]\n")
    with pytest.raises(ConfigError, match="reviews.yaml: unknown key 'text_feilds'"):
        prepare_data(load_config(overrides=[f"data.dataset={prof}"]), data.temp_store(), progress=False)


def test_inspect_reports_fields_labels_imbalance_lengths_and_the_command(tmp_path, capsys):
    f = tmp_path/"skew.jsonl"
    with open(f, "w") as out:
        for i in range(300):
            out.write(json.dumps({"sentence": f"sentence {i} " + "word " * (i % 40), "intent": "rare" if i % 20 == 0 else "common",
                                  "lang": "en"}) + "\n")
    assert main(["data", "inspect", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["rows"], info["text_fields"], info["label_field"]) == ("jsonl", 300, ["sentence"], "intent")
    assert info["label_counts"] == {"common": 285, "rare": 15} and info["imbalance"] == {"ratio": 19.0, "largest": "common", "smallest": "rare", "flagged": True}
    assert [s["field"] for s in info["fields"]] == ["sentence", "intent", "lang"] and info["fields"][2]["examples"] == ["en"]
    assert info["length_words"]["max"] == 41 and info["length_tokens"]["max"] > 41 and 0 <= info["share_over_max_length"] <= 1
    assert info["command"] == f"nlpmt run data -p raw_path {f}"
    assert main(["data", "inspect", str(f)]) == 0
    text = capsys.readouterr().out
    assert "imbalance ratio: 19 (largest 'common' / smallest 'rare')  IMBALANCED" in text and "prepare it with:" in text


def test_inspect_of_an_ambiguous_file_exits_non_zero_naming_the_flags(tmp_path, capsys):
    write_own_data(tmp_path)
    assert main(["data", "inspect", str(tmp_path/"my_data"/"tickets.csv")]) == 1
    out = capsys.readouterr().out
    assert "cannot tell which field holds the label" in out and "queue" in out and "priority" in out


def test_inspect_prints_a_command_that_works_from_the_project_root(tmp_path, monkeypatch, capsys):
    write_own_data(tmp_path)
    monkeypatch.chdir(tmp_path/"my_data"); monkeypatch.setenv("NLPMT_ROOT", str(ROOT))
    assert main(["data", "inspect", "reviews.jsonl", "--json"]) == 0          # a path relative to the current folder
    info = json.loads(capsys.readouterr().out)
    assert info["command"] == f"nlpmt run data -p raw_path {tmp_path/'my_data'/'reviews.jsonl'}"   # outside the root: absolute

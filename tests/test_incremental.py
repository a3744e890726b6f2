"""Incremental `nlpmt pipeline`: fingerprints of each stage's inputs, skipped stages, `--force`, outputs rewritten
behind the pipeline's back; on a local folder and on an S3 store (moto). Real runner jobs run fixture stage
notebooks (`tests/notebooks/pipeline/`, selected with NLPMT_NOTEBOOKS) that count their runs."""
from pathlib import Path
import pytest
from nlpmt.cli import main
from nlpmt.storage import open_store
from nlpmt.fingerprint import fingerprint_key

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data", "baseline", "transformer", "report")


@pytest.fixture
def fixture_stages(monkeypatch):
    "Make the pipeline use the fast fixture stage notebooks."
    monkeypatch.setenv("NLPMT_NOTEBOOKS", str(ROOT/"tests"/"notebooks"/"pipeline"))


def pipeline(capsys, store, raw, *args) -> str:
    "Run `nlpmt pipeline` and return its output (asserting success)."
    rc = main(["pipeline", "--store", store, "--set", f"data.raw_path={raw}", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def runs(store) -> dict:
    "How many times each fixture stage ran."
    s = open_store(store)
    return {st: int(s.read_bytes(f"results/fixture_runs/{st}.txt")) if s.exists(f"results/fixture_runs/{st}.txt") else 0
            for st in STAGES}


def test_pipeline_skips_up_to_date_stages_and_reruns_what_a_change_affects(tmp_path, capsys, fixture_stages):
    store = str(tmp_path/"store")
    raw = tmp_path/"raw.csv"
    raw.write_text("text,label\na,x\nb,y\n")
    pipeline(capsys, store, raw, "--run-id", "first")
    assert runs(store) == dict.fromkeys(STAGES, 1)
    rec = open_store(store).read_json(fingerprint_key("transformer"))
    assert rec["run_id"] == "first" and rec["components"]["config"]["epochs"] == 1.0
    assert set(rec["components"]) >= {"data_hash", "params", "config", "package_version", "notebook"}
    nb_rec = open_store(store).read_json("results/notebooks/first/transformer.json")
    assert nb_rec["fingerprint"] == rec["fingerprint"]     # the job's own record carries it too

    out = pipeline(capsys, store, raw)                        # nothing changed: nothing runs
    assert runs(store) == dict.fromkeys(STAGES, 1)
    for st in STAGES: assert f"nlpmt: {st}: up to date, results from run first" in out

    out = pipeline(capsys, store, raw, "--set", "transformer.epochs=2")   # only transformer and report
    assert runs(store) == {"data": 1, "baseline": 1, "transformer": 2, "report": 2}
    assert "nlpmt: transformer: runs (config changed)" in out and "nlpmt: report: runs (upstream changed)" in out
    assert "nlpmt: baseline: up to date" in out

    pipeline(capsys, store, raw, "--set", "transformer.epochs=2", "--force", "baseline")
    assert runs(store) == {"data": 1, "baseline": 2, "transformer": 2, "report": 2}

    assert main(["run", "transformer", "-p", "epochs", "5", "--store", store]) == 0   # rewrites results/transformer
    capsys.readouterr()
    out = pipeline(capsys, store, raw, "--set", "transformer.epochs=2")
    assert runs(store) == {"data": 1, "baseline": 2, "transformer": 4, "report": 2}   # same inputs again: same report
    assert "nlpmt: transformer: runs (outputs changed)" in out


def test_new_raw_data_changes_every_fingerprint(tmp_path, fixture_stages):
    from nlpmt.core import load_config
    from nlpmt.job_plan import plan_jobs
    from nlpmt.fingerprint import stage_components, fingerprint
    from nlpmt.storage import LocalStore
    raw = tmp_path/"raw.csv"
    raw.write_text("text,label\na,x\n")
    config = load_config(overrides=[f"data.raw_path={raw}"])
    store = LocalStore(tmp_path/"store")
    fp = lambda: fingerprint(stage_components("data", plan_jobs("data", store=str(store.root), config=config), config, store))
    before = fp()
    raw.write_text("text,label\na,y\n")                      # same name and size, new content
    assert fp() != before


@pytest.mark.aws
def test_s3_store_skips_the_same_way(s3_bucket, tmp_path, capsys, fixture_stages):
    store = f"s3://{s3_bucket}/incr"
    raw = tmp_path/"raw.csv"
    raw.write_text("text,label\na,x\n")
    pipeline(capsys, store, raw, "--run-id", "s3first")
    out = pipeline(capsys, store, raw)
    assert runs(store) == dict.fromkeys(STAGES, 1)
    for st in STAGES: assert f"nlpmt: {st}: up to date, results from run s3first" in out


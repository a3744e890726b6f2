"""Jobs and the runner, local backend: real runner subprocesses, real papermill kernels, real stores."""
import json, os, re, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
from nlpmt.cli import main
from nlpmt.core import load_config
from nlpmt.storage import LocalStore, open_store
from nlpmt.job_plan import job_name, job_base_name, plan_jobs, JobSpec
from nlpmt.local_jobs import run_local, run_local_many
from nlpmt.jobs import run_pipeline
from nlpmt.job_tables import results_table, format_table
from nlpmt.runner import (ParameterError, METRIC_DEFINITIONS, log_metrics, notebook_parameters, stage_notebook,
                          check_parameters, JobFolders)

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT/"tests"/"notebooks"
OK, FAIL, SLEEP = str(NB/"ok.ipynb"), str(NB/"fail.ipynb"), str(NB/"sleep.ipynb")
NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


def has_stage(stage):
    "True when the stage notebook exists in nbs/."
    try: stage_notebook(stage); return True
    except ParameterError: return False


@pytest.fixture(scope="module")
def config():
    return load_config()


def test_job_names_unique_within_one_second():
    names = [job_name("nlp-multitype", "all-MiniLM-L6-v2", when=1_700_000_000) for _ in range(1000)]
    assert len(set(names)) == 1000
    assert all(NAME_RE.fullmatch(n) for n in names)
    assert names[0].startswith("nlp-multitype-all-minilm-l6-v2-") and names[0].endswith("-20231114221320")
    # a Training job's base name leaves room for the timestamp the SDK appends
    long = job_base_name("nlp-multitype", "x" * 200)
    assert len(long) + len("-20231114221320") <= 63 and NAME_RE.fullmatch(long)


def test_unknown_parameter_and_wrong_type_stop_before_anything_runs(tmp_path, capsys):
    store = tmp_path/"store"
    rc = main(["run", OK, "--store", str(store), "-p", "n_row", "5", "-p", "rate", "fast", "-p", "flag", "maybe"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "unknown parameter 'n_row'" in err and "'rate' (float, default 0.5)" in err and "'flag' (bool" in err
    assert "n_rows: int = 3  # an integer" in err and "message: str = 'hello'" in err   # the notebook's parameter list
    assert not store.exists()                                                           # nothing ran, nothing written
    with pytest.raises(ParameterError, match="expected an integer, got '3.5'"):
        plan_jobs(OK, {"n_rows": "3.5"}, store=str(store))


def test_values_are_data_never_code(tmp_path, config):
    marker = tmp_path/"pwned"
    evil = f"'); import os; os.system('touch {marker}') #"
    tricky = 'line one\nline "two" \\n not a newline\\\n\'; __import__("os").system("touch ' + str(marker) + '")'
    store = tmp_path/"store"
    spec = plan_jobs(OK, {"message": evil, "tags": json.dumps([tricky, "b"]), "n_rows": "7", "rate": "1e-3", "flag": "yes"},
                     store=str(store), config=config, overrides=["data.seed=7"])[0]
    res = run_local(spec)
    assert res.status == "Completed", res.failure
    rec = LocalStore(store).read_json("results/fixture/ok-tiny.json")
    assert rec["message"] == evil and rec["tags"] == [tricky, "b"]
    assert (rec["n_rows"], rec["rate"], rec["flag"]) == (7, 0.001, True)
    assert rec["types"] == {"message": "str", "n_rows": "int", "rate": "float", "flag": "bool", "tags": "list"}
    assert not marker.exists()
    # the executed notebook is in the store, and the job filled in its folders and config overrides
    nb = json.loads((store/f"results/notebooks/{spec.run_id}/ok.ipynb").read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in nb["cells"])
    assert rec["checkpoint_dir"].endswith("/checkpoints") and rec["env"]["NLPMT_DATA__SEED"] == "7"
    assert rec["env"]["NLPMT_RUN_ID"] == spec.run_id and rec["env"]["SM_HPS"] is None   # processing: no SM_* variables
    assert (store/f"results/notebooks/{spec.run_id}/ok.log").read_text().count("nlpmt-metric epoch=1") == 1


def test_failing_notebook_exit_code_failure_file_and_partial_notebook(tmp_path, config):
    store = tmp_path/"store"
    spec = plan_jobs(FAIL, store=str(store), config=config)[0]
    res = run_local(spec, keep=True)
    assert res.status == "Failed" and res.returncode == 1
    assert "code cell 3" in res.failure and "`# load the labels`" in res.failure
    assert "ValueError: fixture failure: column 'label' missing" in res.failure
    failure_file = Path(res.job_dir)/"output"/"failure"                       # the stand-in /opt/ml/output/failure
    assert "nlpmt stage 'fail' failed in code cell 3" in failure_file.read_text() and "fixture failure" in failure_file.read_text()
    shutil.rmtree(res.job_dir)
    nb = json.loads((store/f"results/notebooks/{spec.run_id}/fail.ipynb").read_text())
    outputs = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    assert "first cell ran" in outputs and "fixture failure" in outputs and "never runs" not in outputs
    record = json.loads((store/f"results/notebooks/{spec.run_id}/fail.json").read_text())
    assert record["status"] == "Failed" and "fixture failure" in record["failure"]


def test_runner_sigterm_checkpoints_and_saves_partial_notebook(tmp_path):
    opt_ml, store = tmp_path/"opt-ml", tmp_path/"store"
    env = {**os.environ, "NLPMT_OPT_ML": str(opt_ml), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nlpmt.runner", "--stage", SLEEP, "--store", str(store), "--run-id", "r1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "training started" in line: proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, "".join(lines)
    assert (opt_ml/"checkpoints"/"checkpoint.txt").read_text() == "step 1\n"      # the stage checkpointed
    failure = (opt_ml/"output"/"failure").read_text()
    assert "stopped by SIGTERM" in failure and "`# train for a while`" in failure and "JobTerminated" in failure
    assert (opt_ml/"output"/"message").read_text() == failure                      # processing jobs read this one
    nb = json.loads((store/"results/notebooks/r1/sleep.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "stream")
    assert "training started" in printed and "training finished" not in printed


def test_ctrl_c_stops_a_local_job_like_a_spot_interruption(tmp_path):
    "Ctrl-C on `nlpmt run` sends the job SIGTERM: the stage checkpoints, the partial notebook is kept, exit code 130."
    store = tmp_path/"store"
    proc = subprocess.Popen([str(Path(sys.executable).parent/"nlpmt"), "run", SLEEP, "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "training started" in line: proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, "".join(lines)
    out = "".join(lines)
    assert "SIGTERM sent" in out and "Stopped" in out and "stopped by SIGTERM in code cell 3" in out
    assert (store/"models"/"checkpoints"/"checkpoint.txt").exists()         # a local store keeps the checkpoints
    (run_dir,) = (store/"results"/"notebooks").iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"sleep.ipynb", "sleep.json", "sleep.log"}
    assert json.loads((run_dir/"sleep.json").read_text())["status"] == "Stopped"


def test_runner_reads_sagemaker_hyperparameters_as_strings(tmp_path):
    opt_ml = tmp_path/"opt-ml"
    (opt_ml/"input"/"config").mkdir(parents=True)
    (opt_ml/"input"/"config"/"hyperparameters.json").write_text(json.dumps(
        {"n_rows": "12", "rate": "0.25", "flag": "true", "tags": '["p", "q"]', "message": "42", "sagemaker_program": "x"}))
    env = {**os.environ, "NLPMT_OPT_ML": str(opt_ml)}
    out = subprocess.run([sys.executable, "-m", "nlpmt.runner", "--stage", OK, "--store", str(tmp_path/"s"), "--run-id", "hp"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rec = LocalStore(tmp_path/"s").read_json("results/fixture/ok-tiny.json")
    assert (rec["n_rows"], rec["rate"], rec["flag"], rec["tags"], rec["message"]) == (12, 0.25, True, ["p", "q"], "42")
    assert rec["checkpoint_dir"] == str(opt_ml/"checkpoints")
    # a bad hyper-parameter fails before the notebook runs, naming it, with exit code 2
    (opt_ml/"input"/"config"/"hyperparameters.json").write_text(json.dumps({"n_rows": "many"}))
    bad = subprocess.run([sys.executable, "-m", "nlpmt.runner", "--stage", OK, "--store", str(tmp_path/"s2")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'n_rows' (int, default 3)" in bad.stderr
    assert "bad parameters" in (opt_ml/"output"/"failure").read_text() and not (tmp_path/"s2").exists()


def _seed_processed(store):
    "A minimal processed-data layout (data report + splits) like the data stage writes."
    from nlpmt.core import sha256_bytes
    splits = {}
    for split in ("train", "val", "test"):
        data = f"text,label\nhello {split},World\n".encode()
        key = f"data/processed/{split}_2class.csv"
        store.write_bytes(key, data)
        splits[split] = {"key": key, "rows": 1, "sha256": sha256_bytes(data), "class_counts": {"World": 1}}
    store.write_json("data/processed/data_report.json", {"labels": ["World", "Sports"], "n_classes": 2, "splits": splits})


def test_training_kind_gets_sagemaker_folders_env_and_channels(tmp_path, config):
    store = LocalStore(tmp_path/"store")
    _seed_processed(store)
    spec = plan_jobs(OK, {"n_rows": "9"}, store=store.uri, config=config, kind="training")[0]
    assert spec.kind == "training"
    res = run_local(spec)
    assert res.status == "Completed", res.failure
    rec = store.read_json("results/fixture/ok-tiny.json")
    env = rec["env"]
    assert rec["n_rows"] == 9 and json.loads(env["SM_HPS"])["n_rows"] == "9"          # hyper-parameters are strings
    assert env["SM_MODEL_DIR"].endswith("/model") and env["SM_OUTPUT_DATA_DIR"].endswith("/output/data")
    assert env["SM_CHANNEL_TRAIN"].endswith("/input/data/train")
    assert rec["checkpoint_dir"].endswith("/checkpoints")


def test_several_models_run_one_job_each_one_gpu_each(tmp_path, config):
    store = LocalStore(tmp_path/"store")
    specs = plan_jobs(OK, store=store.uri, config=config, models=["org/Model-A", "model-b"])
    assert [s.name for s in specs] == ["ok-model-a", "ok-model-b"] and len({s.job_name for s in specs}) == 2
    assert [s.params["model_name"] for s in specs] == ["org/Model-A", "model-b"]
    t = time.time()
    results = run_local_many(specs, gpus=["0", "1"])
    assert [r.status for r in results] == ["Completed", "Completed"], [r.failure for r in results]
    gpus = {store.read_json(f"results/fixture/ok-{m}.json")["env"]["CUDA_VISIBLE_DEVICES"] for m in ("org/Model-A", "model-b")}
    assert gpus == {"0", "1"}
    with pytest.raises(ParameterError, match="needs a model parameter"):
        plan_jobs(FAIL, store=store.uri, config=config, models=["a", "b"])


def test_metric_definitions_match_the_metric_lines(capsys):
    line = log_metrics(epoch=2, train_loss=0.4321, val_loss=0.5, val_accuracy=0.875, val_macro_f1=0.9123)
    assert capsys.readouterr().out.strip() == line
    got = {d["Name"]: re.search(d["Regex"], f"2024-01-01 12:00:00 {line}").group(1) for d in METRIC_DEFINITIONS}
    assert got == {"epoch": "2", "train_loss": "0.4321", "val_loss": "0.5000", "val_accuracy": "0.8750", "val_macro_f1": "0.9123"}


def test_results_table_reads_metrics_files(tmp_path):
    store = LocalStore(tmp_path)
    for model, f1 in (("logreg", 0.81), ("minilm", 0.9)):
        store.write_json(f"results/baseline/{model}_metrics.json", {"model": model, "stage": "baseline", "fit_seconds": 1.0,
                         "validation": {"macro_f1": f1}, "test": {"macro_f1": f1 - 0.01, "accuracy": f1}})
    rows = results_table(store)
    assert [r["model"] for r in rows] == ["minilm", "logreg"]
    assert "val_macro_f1" in format_table(rows).splitlines()[0] and "0.9000" in format_table(rows)


def test_job_bundle_runs_on_its_own(tmp_path, config):
    "The code bundle a SageMaker job receives: its own nlpmt package, notebooks and configs, run from its folder."
    from nlpmt.code_bundle import make_bundle, bundle_stage_arg
    spec = plan_jobs(OK, {"n_rows": "2"}, store=str(tmp_path/"store"), config=config)[0]
    bundle = make_bundle(spec, config, tmp_path/"code")
    script = (bundle/"nlpmt_job.sh").read_text()
    assert "pip install --quiet --disable-pip-version-check -r requirements.txt" in script and 'exec "$PY" -m nlpmt.runner "$@"' in script
    reqs = (bundle/"requirements.txt").read_text().split()
    assert any(r.startswith("papermill") for r in reqs) and not any(r.startswith(("torch", "nbdev", "sagemaker")) for r in reqs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPMT_")}
    env["NLPMT_OPT_ML"] = str(tmp_path/"opt-ml")
    where = subprocess.run([sys.executable, "-c", "import nlpmt, importlib.metadata as m; print(nlpmt.__file__, m.version('nlpmt'))"],
                           cwd=bundle, env=env, capture_output=True, text=True)
    assert where.stdout.split() == [str(bundle/"nlpmt"/"__init__.py"), __import__("nlpmt").__version__]
    out = subprocess.run([sys.executable, "-m", "nlpmt.runner", "--stage", bundle_stage_arg(spec), "--store", spec.store,
                          "--run-id", "bundle", "-p", "n_rows", "2"], cwd=bundle, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"in {bundle/'nbs'}" in out.stderr and LocalStore(tmp_path/"store").read_json("results/fixture/ok-tiny.json")["n_rows"] == 2


def e2e_stages():
    "The stages the end-to-end tests run: data, and baseline once its notebook exists."
    return ["data"] + (["baseline"] if has_stage("baseline") else [])


def check_e2e_store(store, run_id, stages):
    "What the data (and baseline) jobs must leave in a store."
    report = store.read_json("data/processed/data_report.json")
    assert report["n_classes"] == 4 and report["leakage"]["overlapping_texts"] == 0
    assert all(store.exists(report["splits"][s]["key"]) for s in ("train", "val", "test"))
    for stage in stages:
        assert store.exists(f"results/notebooks/{run_id}/{stage}.ipynb")
        assert store.read_json(f"results/notebooks/{run_id}/{stage}.json")["status"] == "Completed"
    if "baseline" in stages:
        assert [k for k in store.list("results/baseline") if k.endswith("_metrics.json")]


@pytest.mark.slow
@pytest.mark.skipif(not has_stage("data"), reason="data stage notebook not written yet")
def test_local_backend_stages_into_a_local_store(tmp_path, config, ag_news_dir):
    stages = e2e_stages()
    results = []
    for stage in stages:
        results += run_local_many(plan_jobs(stage, store=str(tmp_path/"store"), config=config, run_id="e2e"))
    assert [r.status for r in results] == ["Completed"] * len(stages), [r.failure for r in results]
    check_e2e_store(LocalStore(tmp_path/"store"), "e2e", stages)

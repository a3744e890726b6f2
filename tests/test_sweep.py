"""`nlpmt sweep`: real trial jobs (runner subprocesses, papermill kernels) on a fixture stage whose validation score
is a known function of its parameters, the real transformer stage on a tiny random BERT, Ctrl-C, resume, and the
SageMaker requests (training jobs, tuning job) as sent to a moto server."""
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import boto3
import pytest
sys.path.insert(0, str(Path(__file__).resolve().parent))   # sibling test modules (seed_store), however pytest is started
from nlpmt.cli import main
from nlpmt.core import load_config
from nlpmt.storage import LocalStore, S3Store
from nlpmt.sweep_sagemaker import run_sweep_sagemaker
from nlpmt.sweep import (run_sweep, parse_param, manifest_key, read_manifest, trial_prefix,
                         list_sweeps)
from nlpmt.runner import ParameterError

ROOT = Path(__file__).resolve().parents[1]
QUAD = str(ROOT/"tests"/"notebooks"/"quad.ipynb")
ROLE = "arn:aws:iam::123456789012:role/nlpmt-sagemaker"


def env():
    "The environment of a CLI subprocess: this one, with the worktree's package first."
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "NLPMT_ROOT": str(ROOT)}


def test_grid_sweep_runs_each_trial_as_a_job_and_chooses_on_validation(tmp_path, capsys):
    store = tmp_path/"store"
    assert main(["sweep", QUAD, "-p", "x", "0.1,0.3,0.9", "-p", "fail_above", "0.5", "--store", str(store),
                 "--sweep-id", "grid1"]) == 0
    out = capsys.readouterr().out
    m = LocalStore(store).read_json(manifest_key("grid1"))
    assert (m["strategy"], m["objective"], m["direction"]) == ("grid", "val_macro_f1", "maximize")
    assert m["space"][0]["name"] == "x" and m["space"][0]["values"] == [0.1, 0.3, 0.9]
    assert [t["params"]["x"] for t in m["trials"]] == [0.1, 0.3, 0.9]
    assert [t["status"] for t in m["trials"]] == ["Completed", "Completed", "Failed"]
    assert "fixture failure: x=0.9" in m["trials"][2]["failure"]
    assert [t["objective"] for t in m["trials"][:2]] == [pytest.approx(0.96), pytest.approx(1.0)]
    assert m["chosen"]["trial"] == "t001" and m["chosen"]["params"] == {"x": 0.3}
    for t in m["trials"]:                                     # every trial is a normal job with its own run id
        assert t["run_id"] == f"grid1-{t['trial']}"
        rec = LocalStore(store).read_json(f"results/notebooks/{t['run_id']}/quad.json")
        assert rec["status"] == t["status"] and rec["parameters"]["x"] == t["params"]["x"]
    assert re.search(r"^\*\s+t001\s+0\.3\s+1\.0000\s+Completed", out, re.M)      # the table marks the chosen trial
    assert "chosen: t001" in out and m["git_commit"] and m["package_version"]


def test_objective_must_be_a_validation_metric_and_bad_specs_fail_before_any_job(tmp_path, capsys):
    store = tmp_path/"store"
    assert main(["sweep", QUAD, "-p", "x", "0.1,0.3", "--objective", "test_macro_f1", "--store", str(store)]) == 1
    assert "the test split never chooses" in capsys.readouterr().err
    assert main(["sweep", QUAD, "-p", "nope", "1,2", "--store", str(store)]) == 1
    assert "unknown parameter 'nope'" in capsys.readouterr().err
    assert main(["sweep", QUAD, "-p", "x", "log:0..1", "--store", str(store)]) == 1
    assert not (store/"results"/"notebooks").exists()


def test_bayes_sweep_resumes_from_its_manifest(tmp_path):
    store = str(tmp_path/"store")
    space = [parse_param("x", "0.0..1.0"), parse_param("n", "1..3")]
    first = run_sweep(QUAD, space, "bayes", trials=3, store=store, sweep_id="tpe", progress=False).manifest
    assert [t["trial"] for t in first["trials"]] == ["t000", "t001", "t002"]
    again = run_sweep(QUAD, space, "bayes", trials=5, store=store, sweep_id="tpe", progress=False).manifest
    assert [t["trial"] for t in again["trials"]] == ["t000", "t001", "t002", "t003", "t004"]
    assert again["trials"][:3] == first["trials"]           # finished trials are kept, not rerun
    runs = {k.split("/")[2] for k in LocalStore(store).list("results/notebooks") if k.endswith(".ipynb")}
    assert len(runs) == 5 and all(0 <= t["params"]["x"] <= 1 and t["params"]["n"] in (1, 2, 3) for t in again["trials"])
    best = max(again["trials"], key=lambda t: t["objective"])
    assert again["chosen"]["trial"] == best["trial"]
    with pytest.raises(ParameterError, match="exists with another strategy"):
        run_sweep(QUAD, space, "random", trials=5, store=store, sweep_id="tpe", progress=False)


def test_ctrl_c_stops_the_running_trial_and_records_the_sweep(tmp_path):
    store = tmp_path/"store"
    (tmp_path/"tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from nlpmt.cli import main; sys.exit(main())", "sweep", QUAD, "-p", "x", "0.1,0.2", "-p", "sleep", "60",
                             "--sweep", "sleep", "--store", str(store), "--sweep-id", "stopme"],
                            cwd=str(tmp_path), env={**env(), "TMPDIR": str(tmp_path/"tmp")}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # wait until the trial's kernel runs the sleeping cell
        logs = list((tmp_path/"tmp").glob("nlpmt-job-quad-*/job.log"))
        if logs and "code cell 2/" in logs[0].read_text(): break    # the kernel runs the sleeping cell
        time.sleep(0.3)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = out.decode()
    assert proc.returncode == 130, out
    m = json.loads((store/"results"/"sweeps"/"stopme"/"manifest.json").read_text())
    assert [t["status"] for t in m["trials"]] == ["Stopped"] and m["chosen"] is None
    assert "resume with --sweep-id stopme" in out and "Sweep stopme" in out
    rec = json.loads((store/"results"/"notebooks"/"stopme-t000"/"quad.json").read_text())
    assert rec["status"] == "Stopped"                       # the job got SIGTERM and saved its notebook


# ---------------------------------------------------------------- the real transformer stage

@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from nlpmt.transformer import make_tiny_bert, separable_texts
    return make_tiny_bert(tmp_path_factory.mktemp("models")/"tiny-bert", separable_texts(600)["text"])


@pytest.mark.slow   # two real transformer jobs (about 45 s each on a busy 2-core machine)
def test_transformer_sweep_keeps_trial_results_apart_from_the_leaderboard(tmp_path, tiny_bert, capsys):
    from test_transformer import seed_store
    store = LocalStore(tmp_path/"store")
    seed_store(store)
    rc = main(["sweep", "transformer", "-p", "learning_rate", "1e-6,1e-2", "-p", "model_name", str(tiny_bert),
               "-p", "batch_size", "16", "-p", "epochs", "3", "-p", "max_length", "32", "-p", "precision", "fp32",
               "-p", "num_threads", "1", "--store", str(store.root), "--sweep-id", "lr"])
    assert rc == 0, capsys.readouterr()
    m = store.read_json(manifest_key("lr"))
    assert [t["params"]["learning_rate"] for t in m["trials"]] == [1e-6, 1e-2] and len(m["space"]) == 1
    recs = {t["trial"]: store.read_json(f"{trial_prefix('lr', t['trial'])}/transformer/tiny-bert_metrics.json")
            for t in m["trials"]}
    for t in m["trials"]:
        assert t["objective"] == recs[t["trial"]]["validation"]["macro_f1"]
        assert recs[t["trial"]]["params"]["learning_rate"] == t["params"]["learning_rate"]
    assert m["chosen"]["trial"] == max(recs, key=lambda k: recs[k]["validation"]["macro_f1"])
    assert m["chosen"]["params"]["learning_rate"] == 1e-2
    assert not store.exists("results/transformer/tiny-bert_metrics.json")   # trials never overwrite the leaderboard,
    assert not store.exists("results/transformer/transformer_summary.csv")  # its summary, nor the saved models
    assert not store.list("models/final") and store.exists("models/sweeps/lr/t001/tiny-bert/nlpmt_model.json")
    assert [s["sweep_id"] for s in list_sweeps(store)] == ["lr"]
    capsys.readouterr()
    assert main(["run", "baseline", "--store", str(store.root)]) == 0           # a real baseline to compare with
    capsys.readouterr()
    assert main(["report", "--store", str(store.root), "--n-bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert "### Sweep `lr`: transformer, grid" in out and "Chosen on validation: **t001**" in out
    assert re.search(r"Its test macro-F1: \*\*[0-9.]+\*\* \[95% bootstrap [0-9.]+, [0-9.]+\]", out)
    assert re.search(r"- vs baseline \S+ \(test macro-F1 [0-9.]+\): difference [-+][0-9.]+", out)
    png = store.read_bytes("figures/sweeps/lr/learning_rate.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "figures/sweeps/lr/learning_rate.png" in store.read_text("results/sweeps/report.md")


# ---------------------------------------------------------------- SageMaker (moto)

def _seed_s3(bucket):
    "Processed splits and a data report in a fresh S3 store."
    from nlpmt.core import sha256_bytes
    uri = f"s3://{bucket}/proj"
    store, splits = S3Store(uri), {}
    for split in ("train", "val", "test"):
        data = f"text,label\nsome {split} text,World\n".encode()
        store.write_bytes(f"data/processed/{split}_4class.csv", data)
        splits[split] = {"key": f"data/processed/{split}_4class.csv", "rows": 1, "sha256": sha256_bytes(data)}
    store.write_json("data/processed/data_report.json", {"labels": ["World"], "n_classes": 4, "splits": splits})
    return uri


@pytest.fixture
def captured(aws_env):
    "A boto3 session recording the SageMaker Create* requests as sent."
    session = boto3.session.Session(region_name="us-east-1")
    requests = []
    def record(params, model, **kw): requests.append((model.name, json.loads(params["body"])))
    for op in ("CreateTrainingJob", "CreateHyperParameterTuningJob"):
        session.events.register(f"before-call.sagemaker.{op}", record)
    return session, requests


OVERRIDES = ["project.use_spot=true", "project.max_run_seconds=3600", "project.max_wait_seconds=7200",
             "project.training_instance_type=ml.g5.2xlarge"]


@pytest.mark.aws
def test_sagemaker_grid_sweep_sends_one_training_job_per_trial(s3_bucket, captured):
    session, requests = captured
    uri = _seed_s3(s3_bucket)
    config = load_config(overrides=OVERRIDES)
    res = run_sweep_sagemaker("transformer", [parse_param("learning_rate", "5e-5,1e-4,2e-4")], "grid", store=uri,
                              config=config, sweep_id="smgrid", max_parallel=2, poll=0.1, boto_session=session,
                              client=session.client("sagemaker"), role=ROLE)
    assert [op for op, _ in requests] == ["CreateTrainingJob"] * 3
    lrs = sorted(float(req["HyperParameters"]["learning_rate"]) for _, req in requests)
    assert lrs == [5e-5, 1e-4, 2e-4]
    for _, req in requests:
        assert req["EnableManagedSpotTraining"] is True and req["CheckpointConfig"]["S3Uri"].startswith(f"{uri}/models/checkpoints/smgrid-t")
        assert req["Environment"]["NLPMT_SWEEP_ID"] == "smgrid"
        assert req["Environment"]["NLPMT_RESULTS_PREFIX"] == f"results/sweeps/smgrid/trials/{req['Environment']['NLPMT_TRIAL']}"
        assert req["Environment"]["NLPMT_MODELS_PREFIX"] == f"models/sweeps/smgrid/{req['Environment']['NLPMT_TRIAL']}"
    m = S3Store(uri).read_json(manifest_key("smgrid"))
    assert [t["status"] for t in m["trials"]] == ["Completed"] * 3 and len({t["job_names"][0] for t in m["trials"]}) == 3


@pytest.mark.aws
def test_sagemaker_bayes_sweep_is_one_tuning_job_with_the_stage_metrics(s3_bucket, captured):
    session, requests = captured
    uri = _seed_s3(s3_bucket)
    config = load_config(overrides=OVERRIDES)
    space = [parse_param("learning_rate", "log:1e-5..1e-3"), parse_param("batch_size", "16..64"),
             parse_param("precision", "bf16,fp32")]
    res = run_sweep_sagemaker("transformer", space, "bayes", trials=4, max_parallel=2, store=uri, config=config,
                              sweep_id="smtpe", base_params={"max_train_rows": "300"}, boto_session=session,
                              client=session.client("sagemaker"), role=ROLE)
    (op, req), = [r for r in requests if r[0] == "CreateHyperParameterTuningJob"]
    cfg = req["HyperParameterTuningJobConfig"]
    assert cfg["Strategy"] == "Bayesian" and cfg["TrainingJobEarlyStoppingType"] == "Auto"
    assert cfg["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "val_macro_f1"}
    assert cfg["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 4 and cfg["ResourceLimits"]["MaxParallelTrainingJobs"] == 2
    ranges = cfg["ParameterRanges"]
    assert ranges["ContinuousParameterRanges"] == [{"Name": "learning_rate", "MinValue": "1e-05", "MaxValue": "0.001",
                                                    "ScalingType": "Logarithmic"}]
    assert ranges["IntegerParameterRanges"][0]["Name"] == "batch_size"
    assert ranges["CategoricalParameterRanges"] == [{"Name": "precision", "Values": ["bf16", "fp32"]}]
    job = req["TrainingJobDefinition"]
    from nlpmt.runner import METRIC_DEFINITIONS
    assert job["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert job["CheckpointConfig"]["S3Uri"].startswith(f"{uri}/models/checkpoints/")
    static = job["StaticHyperParameters"]
    assert static["max_train_rows"] == "300" and static["sagemaker_program"] == "nlpmt_tune.sh"
    assert "learning_rate" not in static and "batch_size" not in static
    assert job["Environment"]["NLPMT_SWEEP_ID"] == "smtpe" and "NLPMT_RUN_ID" not in job["Environment"]
    channels = {c["ChannelName"] for c in job["InputDataConfig"]}
    assert {"train", "val", "test"} <= channels
    assert S3Store(uri).read_json(manifest_key("smtpe"))["tuning_job"] == req["HyperParameterTuningJobName"]
    again = run_sweep_sagemaker("transformer", space, "bayes", trials=4, max_parallel=2, store=uri, config=config,
                                sweep_id="smtpe", boto_session=session, client=session.client("sagemaker"), role=ROLE)
    assert len([r for r in requests if r[0] == "CreateHyperParameterTuningJob"]) == 1   # same sweep: no second tuning job
    assert again.manifest["tuning_status"] and S3Store(uri).read_json(manifest_key("smtpe"))["tuning_status"]

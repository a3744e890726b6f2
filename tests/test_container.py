"""The container backend: the SageMaker request (as the SDK sent it to a moto server) executed on this machine as the
platform would, in a PID and mount namespace; spot interruption drills for Training and Processing jobs; failures
read from /opt/ml/output/failure; PID-1 signal semantics and the path-rewrite fallback."""
import io, json, re, shutil, signal, sys
from pathlib import Path
import boto3
import pytest
from nlpmt.cli import main
from nlpmt.container import Interruption, isolation_mode, run_container, run_container_job
from nlpmt.container_job import ContainerJob, host_path, download_s3
from nlpmt.core import load_config
from nlpmt.job_plan import plan_jobs
from nlpmt.metrics import metrics_key
from nlpmt.storage import LocalStore, S3Store
from nlpmt.transformer import make_tiny_bert, separable_texts, train_params, train_transformer
from test_transformer import seed_store

pytestmark = pytest.mark.aws
ROOT = Path(__file__).resolve().parents[1]
FAIL = str(ROOT/"tests"/"notebooks"/"fail.ipynb")
# small enough to be quick, long enough (3 epochs of 53 steps) for an interruption to land mid-epoch
TINY = dict(epochs=3, learning_rate=1e-2, batch_size=8, max_length=32, save_steps=1000, precision="fp32", num_threads=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    "A tiny random BERT with a WordPiece vocabulary of the synthetic texts."
    return make_tiny_bert(tmp_path_factory.mktemp("models")/"tiny-bert", separable_texts(600)["text"])


@pytest.fixture
def s3_store(s3_bucket):
    "An S3 store on the moto server holding synthetic processed splits; yields (uri, data report)."
    uri = f"s3://{s3_bucket}/proj"
    return uri, seed_store(S3Store(uri), n=600)


def cli_params(params: dict) -> list[str]:
    return [a for k, v in params.items() for a in ("-p", k, str(v))]


@pytest.mark.slow
def test_transformer_job_runs_the_sdk_request_in_a_container(s3_store, tiny_model, capsys):
    """Done when: `nlpmt run transformer --backend container` against moto completes; notebook, metrics and model in
    the store, model.tar.gz under the output path, the SDK driver's lines in the log (store and CloudWatch)."""
    uri, _ = s3_store
    params = dict(TINY, epochs=1, model_name=tiny_model, max_train_rows=120)
    assert main(["run", "transformer", "--backend", "container", "--store", uri, *cli_params(params)]) == 0
    out = capsys.readouterr().out
    name = re.search(r"training job (\S+): executing the request read back", out).group(1)
    run_id = re.search(r"results/notebooks/([^/]+)/transformer\.ipynb", out).group(1)
    store = S3Store(uri)
    metrics = store.read_json(metrics_key("transformer", "tiny-bert"))
    assert metrics["train_rows"] == 120 and metrics["resumed_from_step"] is None
    assert store.exists(f"results/notebooks/{run_id}/transformer.ipynb") and store.exists("models/final/tiny-bert/model.safetensors")
    assert store.exists(f"models/output/{name}/output/model.tar.gz") and store.exists(f"models/output/{name}/output/output.tar.gz")
    log = store.read_text(f"results/notebooks/{run_id}/transformer.log")
    for line in ("Starting training script", "Setting up environment variables", "Executing command: exec bash nlpmt_job.sh",
                 "nlpmt-runner: stage transformer completed"):
        assert line in log and line in out, line
    assert "status:           Completed" in out and "(training, container backend" in out
    assert main(["jobs", "logs", name]) == 0                        # the job's CloudWatch stream, as for real jobs
    assert "Executing command: exec bash nlpmt_job.sh" in capsys.readouterr().out


@pytest.mark.slow
def test_spot_interruption_checkpoints_at_sigterm_and_attempt_2_matches_an_uninterrupted_run(s3_store, tiny_model, tmp_path):
    """SIGTERM reaches the runner as PID 1 under the SDK's driver, the stage checkpoints at that step, the checkpoint
    reaches CheckpointConfig.S3Uri, attempt 2 starts in a fresh /opt/ml from S3 only and resumes from that step, and
    the final metrics equal an uninterrupted run's (same seed) in every score and prediction."""
    uri, report = s3_store
    config = load_config()
    params = dict(TINY, model_name=str(tiny_model))
    spec = plan_jobs("transformer", params, store=uri, config=config)[0]
    out = io.StringIO()
    # the interruption comes the moment the stage prints its start line ("N training rows ..."), the earliest a
    # supervisor can tell training began: train_transformer prints it only after its SIGTERM handler is installed, so
    # the stop lands before or at the first optimizer steps, mid-epoch: periodic saves are off (save_steps 1000)
    start_line = rf"^tiny-bert: {report['splits']['train']['rows']} training rows"
    res = run_container(spec, config, out=out, interruption=Interruption(on_line=start_line, grace_seconds=60))
    log = out.getvalue()
    assert res.status == "Completed", log[-4000:]
    attempts = re.findall(r"attempt (\d) ended: exit code (\d+)(?: \((\w[\w-]*)\))?", log)
    assert attempts == [("1", "143", "interruption"), ("2", "0", "")], attempts
    assert "still running after the grace period" not in log                  # stopped by SIGTERM, not SIGKILL
    stopped_at = int(re.search(r"stopped by SIGTERM at step (\d+)", log).group(1))
    assert 1 <= stopped_at < 159 and len(re.findall("stopped by SIGTERM at step", log)) == 1
    assert re.search(r"attempt 2: /opt/ml/checkpoints restored from s3://\S+ \([1-9]\d* files\)", log)
    store = S3Store(uri)
    resumed = store.read_json(metrics_key("transformer", "tiny-bert"))
    assert resumed["resumed_from_step"] == stopped_at

    ref_store = LocalStore(tmp_path/"reference")
    seed_store(ref_store, n=600)
    ref = train_transformer(ref_store, train_params(config, **{k: v for k, v in params.items() if k != "num_threads"}),
                            config, checkpoint_dir=str(tmp_path/"ref-ckpt"), num_threads=1, progress=False).record
    assert ref["data"] == resumed["data"] and ref["run"] == resumed["run"]
    for key in ("validation", "test", "predictions", "steps", "best_step", "train_rows"):
        assert resumed[key] == ref[key], key
    for a, b in zip(resumed["history"], ref["history"], strict=True):
        for k in ("epoch", "step", "val_loss", "val_accuracy", "val_macro_f1"): assert a[k] == b[k], (k, a, b)


def test_failing_notebook_ends_failed_with_the_reason_from_opt_ml_output_failure(s3_bucket):
    uri = f"s3://{s3_bucket}/fail"
    seed_store(S3Store(uri), n=30)                                             # Training channels need processed data
    config = load_config()
    spec = plan_jobs(FAIL, store=uri, config=config, kind="training")[0]
    out = io.StringIO()
    res = run_container(spec, config, out=out)
    assert res.status == "Failed" and res.returncode == 1 and res.backend == "container"
    assert res.failure.startswith("nlpmt stage 'fail' failed in code cell 3")          # /opt/ml/output/failure, verbatim
    assert "ValueError: fixture failure: column 'label' missing" in res.failure and "executed notebook: s3://" in res.failure
    assert "status:           Failed / Failed" in out.getvalue() and "failure reason:   nlpmt stage 'fail'" in out.getvalue()
    store = S3Store(uri)
    nb = json.loads(store.read_text(f"results/notebooks/{spec.run_id}/fail.ipynb"))     # the partial notebook
    outputs = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    assert "first cell ran" in outputs and "fixture failure" in outputs and "never runs" not in outputs
    assert store.list(f"models/output/{res.job_name}/output") == [f"models/output/{res.job_name}/output/output.tar.gz"]


def job_cell_number(notebook: str) -> int:
    "The 1-based number, among code cells, of a stage notebook's job cell (the runner's `code cell N/M` lines)."
    cells = json.loads((ROOT/"nbs"/notebook).read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    return next(i + 1 for i, src in enumerate(code) if "job_params = " in src)


@pytest.mark.slow
def test_processing_job_interrupted_stops_cleanly_or_finishes_nothing_half_written(s3_bucket, ag_news_dir):
    "The data stage as a Processing job, SIGTERM while its job cell writes: Stopped or Completed, data/processed whole."
    uri = f"s3://{s3_bucket}/data"
    store = S3Store(uri)
    for name in ("test.csv", "classes.txt"): store.upload_file(ag_news_dir/name, f"data/raw/{name}")
    config = load_config()
    spec = plan_jobs("data", {"raw_path": "data/raw/test.csv", "label_names_file": "data/raw/classes.txt"}, store=uri, config=config)[0]
    out = io.StringIO()
    res = run_container(spec, config, out=out, interruption=Interruption(on_line=rf"nlpmt-runner: code cell {job_cell_number('02_data.ipynb')}/",
                                                                       grace_seconds=60))
    log = out.getvalue()
    assert "simulated spot interruption: SIGTERM to the container's PID 1" in log, log[-3000:]
    assert res.status in ("Stopped", "Completed"), log[-3000:]
    assert len(re.findall(r"attempt \d ended", log)) == 1                       # Processing jobs are not restarted
    keys = store.list("data/processed")
    assert not [k for k in keys if Path(k).name.startswith(".") or ".tmp" in k], keys   # no temporary leftovers
    if res.status == "Stopped":
        assert "stopped by SIGTERM" in res.failure and "still running after the grace period" not in log
    if store.exists("data/processed/data_report.json"):                          # whatever was published is whole
        from nlpmt.core import sha256_bytes
        report = store.read_json("data/processed/data_report.json")
        for split in report["splits"].values():
            assert sha256_bytes(store.read_bytes(split["key"])) == split["sha256"], split["key"]
    else:
        assert res.status == "Stopped"


# ---------------------------------------------------------------- PID 1 and the rewrite fallback, without the SDK

def processing_job(argv: list[str]) -> ContainerJob:
    "A Processing job request with no S3 inputs or outputs running `argv`."
    return ContainerJob("local-check", "processing", {"AppSpecification": {"ContainerEntrypoint": argv[:1], "ContainerArguments": argv[1:]},
                                                     "StoppingCondition": {"MaxRuntimeInSeconds": 600}})


HANDLER = ("import signal, sys, time, pathlib\n"
           "signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path('/opt/ml/output/got').write_text('SIGTERM'), sys.exit(143)))\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")


@pytest.mark.skipif(isolation_mode() != "namespace", reason="needs unshare --pid --fork --mount (root or user namespaces)")
def test_pid_1_ignores_sigterm_without_a_handler_so_only_exec_lets_it_reach_the_runner(tmp_path):
    """Why the job command `exec`s: a shell as PID 1 (SDK driver style, the command a child) never sees SIGTERM and is
    SIGKILLed after the grace period; with `exec` the Python process is PID 1, handles SIGTERM and writes its file."""
    shell = processing_job(["/bin/bash", "-c", f"{shlex_quote(sys.executable)} -c {shlex_quote(HANDLER)}; echo after"])
    res = run_container_job(shell, None, out=io.StringIO(), interruption=Interruption(on_line="^ready", grace_seconds=3), keep=True)
    assert res.status == "Stopped" and res.attempts[0].stopped_by == "interruption"
    assert res.attempts[0].killed and not (Path(res.root)/"output/got").exists()
    shutil.rmtree(Path(res.root).parent.parent, ignore_errors=True)
    execd = processing_job(["/bin/bash", "-c", f"exec {shlex_quote(sys.executable)} -c {shlex_quote(HANDLER)}"])
    res = run_container_job(execd, None, out=io.StringIO(), interruption=Interruption(on_line="^ready", grace_seconds=30), keep=True)
    assert not res.attempts[0].killed and res.attempts[0].returncode == 143
    assert (Path(res.root)/"output/got").read_text() == "SIGTERM"
    shutil.rmtree(Path(res.root).parent.parent, ignore_errors=True)


def test_path_rewrite_fallback_maps_opt_ml_into_the_job_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NLPMT_CONTAINER_ISOLATION", "rewrite")
    job = processing_job(["/bin/sh", "-c", "echo hi > /opt/ml/output/data/x && echo \"$NLPMT_OPT_ML\" > /opt/ml/output/message; exit 3"])
    res = run_container_job(job, None, out=io.StringIO(), keep=True)
    root = Path(res.root)
    assert res.isolation == "rewrite" and res.status == "Failed" and res.failure_reason == str(root)
    assert (root/"output/data/x").read_text() == "hi\n"
    shutil.rmtree(root.parent.parent, ignore_errors=True)


def shlex_quote(text: str) -> str:
    import shlex
    return shlex.quote(text)


def test_s3_prefix_downloads_follow_sagemaker_naming_and_stay_inside_the_channel(s3_bucket, tmp_path):
    s3 = boto3.session.Session().client("s3")
    for key in ("p/data/train.csv", "p/code/a.py", "p/code/sub/b.py", "p/code2/c.py"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    names = lambda files, base: sorted(str(f.relative_to(base)) for f in files)
    assert names(download_s3(s3, f"s3://{s3_bucket}/p/data/train.csv", tmp_path/"a"), tmp_path/"a") == ["train.csv"]
    # no trailing slash: a plain string prefix, as in S3 (p/code2/ matches too, named from the prefix's folder)
    assert names(download_s3(s3, f"s3://{s3_bucket}/p/code", tmp_path/"b"), tmp_path/"b") == ["a.py", "code2/c.py", "sub/b.py"]
    got = names(download_s3(s3, f"s3://{s3_bucket}/p/code/", tmp_path/"c"), tmp_path/"c")
    assert got == ["a.py", "sub/b.py"]
    s3.put_object(Bucket=s3_bucket, Key="q/../../escape.txt", Body=b"x")
    with pytest.raises(ValueError, match="outside"):
        download_s3(s3, f"s3://{s3_bucket}/q/", tmp_path/"d")
    assert host_path(tmp_path, "/opt/ml/processing/input/code") == tmp_path/"processing/input/code"


def test_max_runtime_stops_the_job_with_sigterm_then_reports_stopped(tmp_path):
    job = processing_job(["/bin/bash", "-c", f"exec {shlex_quote(sys.executable)} -c {shlex_quote(HANDLER)}"])
    job.request["StoppingCondition"]["MaxRuntimeInSeconds"] = 2
    out = io.StringIO()
    res = run_container_job(job, None, out=out, keep=True)
    assert res.status == "Stopped" and res.secondary_status == "MaxRuntimeExceeded", out.getvalue()
    assert res.attempts[0].returncode == 143 and not res.attempts[0].killed
    assert (Path(res.root)/"output/got").read_text() == "SIGTERM" and "MaxRuntimeInSeconds (2 s) reached" in out.getvalue()
    shutil.rmtree(Path(res.root).parent.parent, ignore_errors=True)


def test_container_backend_refuses_a_sagemaker_api_that_would_run_the_job(s3_bucket, monkeypatch, capsys):
    "Against AWS itself the container backend would start (and bill) a real job: refused before anything is created."
    monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER", "https://api.sagemaker.us-east-1.amazonaws.com")
    args = ["--backend", "container", "--store", f"s3://{s3_bucket}/p"]
    assert main(["run", FAIL, "--job-type", "training", *args]) == 1
    assert main(["pipeline", "-p", "raw_path", "data/raw/test.csv", "-p", "label_names_file", "data/raw/classes.txt", *args]) == 1
    err = capsys.readouterr().err
    assert err.count("the container backend creates the job on a SageMaker API that does not run it") == 2
    assert "AWS_ENDPOINT_URL_SAGEMAKER=http://127.0.0.1:5055" in err
    assert not S3Store(f"s3://{s3_bucket}/p").list("code")                        # no bundle was uploaded

"""The SageMaker backend and `nlpmt jobs` against a moto server: the requests the SDK really sends are captured
with a botocore hook on the session it uses (moto drops several request fields from its Describe answers)."""
import json, re, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import boto3
import pytest
from nlpmt.cli import main
from nlpmt.core import load_config, sha256_bytes
from nlpmt.storage import S3Store
from nlpmt.jobs import plan_jobs, submit_sagemaker, describe_job, job_cost_info, run_local, JobStatus, checkpoint_prefix
from nlpmt.runner import METRIC_DEFINITIONS, log_metrics

pytestmark = pytest.mark.aws
ROOT = Path(__file__).resolve().parents[1]
OK = str(ROOT/"tests"/"notebooks"/"ok.ipynb")
ROLE = "arn:aws:iam::123456789012:role/nlpmt-sagemaker"
NAME_RE = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
OVERRIDES = ["project.use_spot=true", "project.max_run_seconds=3600", "project.max_wait_seconds=7200",
             "project.training_instance_type=ml.g5.2xlarge", "project.processing_instance_type=ml.m5.large"]


@pytest.fixture
def store_uri(s3_bucket):
    "An S3 store on moto holding processed data (what the transformer's channels read)."
    uri = f"s3://{s3_bucket}/proj"
    store = S3Store(uri)
    splits = {}
    for split in ("train", "val", "test"):
        data = f"text,label\nsome {split} text,World\n".encode()
        key = f"data/processed/{split}_4class.csv"
        store.write_bytes(key, data)
        splits[split] = {"key": key, "rows": 1, "sha256": sha256_bytes(data)}
    store.write_json("data/processed/data_report.json", {"labels": ["World"], "n_classes": 4, "splits": splits})
    return uri


@pytest.fixture
def captured(aws_env):
    "A boto3 session whose SageMaker Create* requests are recorded as sent (JSON body)."
    session = boto3.session.Session(region_name="us-east-1")
    requests = []
    def record(params, model, **kw): requests.append((model.name, json.loads(params["body"])))
    for op in ("CreateTrainingJob", "CreateProcessingJob"):
        session.events.register(f"before-call.sagemaker.{op}", record)
    return session, requests


def test_training_job_request(store_uri, captured):
    session, requests = captured
    config = load_config(overrides=OVERRIDES)
    message = "it's \"quoted\"\nsecond line"
    spec = plan_jobs(OK, {"n_rows": "5", "message": message, "tags": "a,b"}, store=store_uri, config=config,
                     kind="training", models=["sentence-transformers/all-MiniLM-L6-v2"])[0]
    job = submit_sagemaker(spec, config, role=ROLE, boto_session=session)
    (op, req), = requests
    assert op == "CreateTrainingJob" and req["TrainingJobName"] == job.job_name and NAME_RE.fullmatch(job.job_name)
    assert re.fullmatch(r"nlp-multitype-all-minilm-l6-v2-[0-9a-f]{6}-\d{14}", job.job_name)
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert req["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge" and req["RoleArn"] == ROLE
    assert req["CheckpointConfig"] == {"S3Uri": f"{store_uri}/models/checkpoints/{spec.run_id}/ok", "LocalPath": "/opt/ml/checkpoints"}
    assert req["OutputDataConfig"]["S3OutputPath"] == f"{store_uri}/models/output"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in req["InputDataConfig"]}
    assert {k: channels[k] for k in ("train", "val", "test")} == {s: f"{store_uri}/data/processed/{s}_4class.csv" for s in ("train", "val", "test")}
    assert channels["code"].startswith(f"{store_uri}/code/")
    hps = req["HyperParameters"]
    assert hps["n_rows"] == "5" and hps["message"] == message and json.loads(hps["tags"]) == ["a", "b"]
    assert hps["store"] == store_uri and hps["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    tags = {t["Key"]: t["Value"] for t in req["Tags"]}
    assert tags["project"] == "nlp-multitype" and tags["owner"] == "research"
    assert tags["nlpmt:run-id"] == spec.run_id and tags["nlpmt:model"] == "all-minilm-l6-v2"
    assert req["Environment"]["NLPMT_RUN_ID"] == spec.run_id
    metrics = {m["Name"]: m["Regex"] for m in req["AlgorithmSpecification"]["MetricDefinitions"]}
    line = log_metrics(epoch=3, train_loss=0.25, val_macro_f1=0.875)
    assert re.search(metrics["train_loss"], line).group(1) == "0.2500" and re.search(metrics["val_macro_f1"], line).group(1) == "0.8750"
    assert req["AlgorithmSpecification"]["TrainingImage"].endswith("pytorch-training:2.5-gpu-py311")
    # the code channel holds the runner, the notebooks, the configs and the entry script
    code = S3Store(channels["code"]).list()
    assert {"nlpmt/runner.py", "nlpmt_job.sh", "requirements.txt", "nbs/ok.ipynb", "configs/project.yaml"} <= set(code)


def test_processing_job_request(store_uri, captured):
    session, requests = captured
    config = load_config(overrides=OVERRIDES)
    evil = "'); import os; os.system('touch /tmp/pwned') #"
    spec = plan_jobs(OK, {"message": evil, "n_rows": "4"}, store=store_uri, config=config)[0]
    job = submit_sagemaker(spec, config, role=ROLE, boto_session=session)
    (op, req), = requests
    assert op == "CreateProcessingJob" and req["ProcessingJobName"] == job.job_name
    assert re.fullmatch(re.escape(spec.job_name) + r"-\d{14}", job.job_name) and NAME_RE.fullmatch(job.job_name)
    app = req["AppSpecification"]
    assert app["ContainerEntrypoint"] == ["bash", "/opt/ml/processing/input/code/nlpmt_job.sh"]
    args = app["ContainerArguments"]
    assert args[:8] == ["--stage", "nbs/ok.ipynb", "--store", store_uri, "--run-id", spec.run_id, "--name", "ok"]
    pairs = {args[i + 1]: args[i + 2] for i in range(len(args)) if args[i] == "-p"}
    assert pairs["message"] == evil and pairs["n_rows"] == "4"
    assert req["ProcessingResources"]["ClusterConfig"]["InstanceType"] == "ml.m5.large"
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}
    assert req["ProcessingInputs"][0]["S3Input"]["LocalPath"] == "/opt/ml/processing/input/code"
    assert {t["Key"]: t["Value"] for t in req["Tags"]}["nlpmt:stage"] == "ok"
    assert req["Environment"]["NLPMT_RUN_ID"] == spec.run_id


def test_names_stay_unique_when_jobs_start_in_the_same_second(store_uri, captured):
    session, requests = captured
    config = load_config(overrides=OVERRIDES)
    specs = plan_jobs(OK, store=store_uri, config=config, kind="training", models=["bert-base-uncased"] * 3)
    with ThreadPoolExecutor(3) as pool:    # started together: the SDK's second-resolution timestamps mostly coincide
        names = list(pool.map(lambda s: submit_sagemaker(s, config, role=ROLE, boto_session=session).job_name, specs))
    assert len(set(names)) == 3 and all(NAME_RE.fullmatch(n) for n in names)
    assert len({n.rsplit("-", 1)[0] for n in names}) == 3            # unique even without the timestamp
    assert {r["TrainingJobName"] for _, r in requests} == set(names)


def test_cli_run_prints_job_and_results_location_then_jobs_commands(store_uri, aws_env, capsys):
    common = ["--store", store_uri, "--role", ROLE] + [a for o in OVERRIDES for a in ("--set", o)]
    assert main(["run", OK, "--backend", "sagemaker", "--job-type", "training", "-p", "n_rows", "6"] + common) == 0
    out = capsys.readouterr().out
    name = out.splitlines()[0]
    assert NAME_RE.fullmatch(name) and "(spot)" in out and f"{store_uri}/results/notebooks/" in out
    assert main(["run", OK, "--backend", "sagemaker", "--wait", "--poll", "0.1"] + common) == 0   # processing, waits
    waited = capsys.readouterr().out
    assert "Completed" in waited and "Jobs" in waited
    pname = re.search(r"(nlp-multitype-ok-[0-9a-f]{6}-\d{14})", waited).group(1)

    assert main(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert name in listing and pname in listing and "training" in listing and "processing" in listing

    assert main(["jobs", "status", name]) == 0
    status = capsys.readouterr().out
    assert "status:           Completed" in status and "ml.g5.2xlarge (spot)" in status and "billable seconds:" in status
    assert "cost:" in status and "run id:" in status

    logs = boto3.client("logs")
    group = "/aws/sagemaker/TrainingJobs"
    logs.create_log_group(logGroupName=group)
    now = int(time.time() * 1000)
    for stream, events in ((f"{name}/algo-1-1", [(now, "nlpmt-runner: cell 1/5"), (now + 20, "nlpmt-metric epoch=1 train_loss=0.5000")]),
                           (f"{name}/algo-2-1", [(now + 10, "second instance says hi")])):
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        logs.put_log_events(logGroupName=group, logStreamName=stream, logEvents=[{"timestamp": t, "message": m} for t, m in events])
    assert main(["jobs", "logs", name, "--follow"]) == 0
    assert capsys.readouterr().out.splitlines() == ["nlpmt-runner: cell 1/5", "second instance says hi",
                                                    "nlpmt-metric epoch=1 train_loss=0.5000"]
    assert main(["jobs", "logs", pname]) == 0                      # no log group for processing jobs yet
    assert "no log events yet" in capsys.readouterr().err

    assert main(["jobs", "stop", pname]) == 0                      # moto finishes jobs at once: nothing to stop
    assert f"{pname}: Completed" in capsys.readouterr().out
    assert main(["jobs", "status", "nlp-multitype-nope-000000-20240101000000"]) == 1
    assert "no SageMaker training or processing job named" in capsys.readouterr().err


def test_cost_and_spot_savings():
    st = JobStatus("j", "training", "Completed", instance_type="ml.g5.xlarge", spot=True, training_seconds=1000, billable_seconds=400)
    info = job_cost_info(st)
    assert info["spot_savings_pct"] == 60.0 and info["billable_seconds"] == 400
    try: from nlpmt.aws import job_cost
    except ImportError: assert "nlpmt.aws" in info["note"]; return
    assert info["usd"] == job_cost("ml.g5.xlarge", 400, True) and info["on_demand_usd"] == job_cost("ml.g5.xlarge", 1000, False)


@pytest.mark.slow
def test_local_backend_stages_into_s3(s3_bucket, ag_news_dir):
    from test_jobs import e2e_stages, check_e2e_store
    uri, stages = f"s3://{s3_bucket}/e2e", e2e_stages()
    config = load_config()
    results = []
    for stage in stages:
        results += [run_local(spec) for spec in plan_jobs(stage, store=uri, config=config, run_id="e2e-s3")]
    assert [r.status for r in results] == ["Completed"] * len(stages), [r.failure for r in results]
    check_e2e_store(S3Store(uri), "e2e-s3", stages)


def test_local_backend_into_s3_store(store_uri):
    spec = plan_jobs(OK, {"n_rows": "8"}, store=store_uri, config=load_config())[0]
    res = run_local(spec)
    assert res.status == "Completed", res.failure
    store = S3Store(store_uri)
    assert store.read_json("results/fixture/ok-tiny.json")["n_rows"] == 8
    assert store.exists(f"results/notebooks/{spec.run_id}/ok.ipynb") and res.notebook_url.startswith("s3://")


def test_sagemaker_backend_needs_an_s3_store_and_a_role(tmp_path, aws_env):
    config = load_config()
    spec = plan_jobs(OK, store=str(tmp_path), config=config)[0]
    with pytest.raises(ValueError, match="needs an s3:// store"):
        submit_sagemaker(spec, config, role=ROLE)
    spec = plan_jobs(OK, store="s3://some-bucket/p", config=config)[0]
    with pytest.raises(ValueError, match="no SageMaker execution role"):
        submit_sagemaker(spec, load_config(overrides=["project.role_arn=null"]))


def test_data_stage_on_sagemaker_needs_inputs_the_container_can_read(store_uri, captured):
    session, requests = captured
    config = load_config(overrides=OVERRIDES)
    spec = plan_jobs("data", store=store_uri, config=config)[0]            # configs point at ../shared/data/...
    with pytest.raises(ValueError, match="data.raw_path .* is a file on this machine"):
        submit_sagemaker(spec, config, role=ROLE, boto_session=session)
    spec = plan_jobs("data", {"raw_path": "data/raw/test.csv", "label_names_file": "data/raw/classes.txt",
                              "config_dir": str(ROOT/"configs")}, store=store_uri, config=config)[0]
    submit_sagemaker(spec, config, role=ROLE, boto_session=session)
    (op, req), = requests
    args = req["AppSpecification"]["ContainerArguments"]
    assert args[:2] == ["--stage", "data"] and "config_dir" not in args    # the bundle carries the configs


def test_transformer_stage_with_several_models_is_one_training_job_each(store_uri, captured):
    session, requests = captured
    config = load_config(overrides=OVERRIDES)
    specs = plan_jobs("transformer", {"epochs": "2", "max_train_rows": "500"}, store=store_uri, config=config,
                      models=["bert-base-uncased", "roberta-base"])
    assert [s.kind for s in specs] == ["training", "training"]
    jobs = [submit_sagemaker(s, config, role=ROLE, boto_session=session) for s in specs]
    assert len({j.job_name for j in jobs}) == 2 and [op for op, _ in requests] == ["CreateTrainingJob"] * 2
    for spec, (_, req) in zip(specs, requests):
        hps = req["HyperParameters"]
        assert (hps["model_name"], hps["epochs"], hps["max_train_rows"]) == (spec.model, "2.0", "500")
        assert req["CheckpointConfig"]["S3Uri"] == f"{store_uri}/{checkpoint_prefix(spec)}"
        assert req["AlgorithmSpecification"]["ContainerArguments"][-1].endswith("sm_train.sh")
    assert requests[0][1]["CheckpointConfig"]["S3Uri"] != requests[1][1]["CheckpointConfig"]["S3Uri"]


def test_pipeline_on_sagemaker_runs_every_stage_as_a_job_in_order(store_uri, aws_env, capsys):
    common = ["--store", store_uri, "--role", ROLE, "--backend", "sagemaker", "--poll", "0.1"] + \
             [a for o in OVERRIDES for a in ("--set", o)]
    count = lambda: len(boto3.client("sagemaker").list_processing_jobs(MaxResults=100)["ProcessingJobSummaries"])
    before = count()
    assert main(["pipeline"] + common) == 1                                   # local raw file: refused before any job
    assert "is a file on this machine" in capsys.readouterr().err and count() == before
    assert main(["pipeline", "-p", "raw_path", "data/raw/test.csv", "-p", "label_names_file", "data/raw/classes.txt"] + common) == 0
    out = capsys.readouterr().out
    started = re.findall(r"started (training|processing) job (\S+);", out)
    assert [k for k, _ in started] == ["processing", "processing", "training", "processing"]
    assert all(f"{name}: Completed" in out for _, name in started)
    table = out[out.index("\nJobs\n"):]
    assert [line.split()[0] for line in table.strip().splitlines()[3:7]] == ["data", "baseline", "transformer", "report"]

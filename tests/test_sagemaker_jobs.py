"""The SageMaker backend and `nlpmt jobs` against a moto server: the requests the SDK really sends are captured
with a botocore hook on the session it uses (moto drops several request fields from its Describe answers)."""
import base64, datetime, json, os, re, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
import boto3
import pytest
from nlpmt import aws
from nlpmt.cli import main
from nlpmt.core import load_config, sha256_bytes
from nlpmt.storage import S3Store
from nlpmt.job_plan import plan_jobs, checkpoint_prefix
from nlpmt.backends import JobStatus
from nlpmt.local_jobs import run_local
from nlpmt.sagemaker_jobs import submit_sagemaker, describe_job, LOG_GROUPS
from nlpmt.job_tables import job_cost_info, format_cost_lines
from nlpmt.runner import METRIC_DEFINITIONS, log_metrics
from conftest import free_port, _wait_http

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


def s3_uris(value) -> list[str]:
    "Every s3:// URI anywhere in a request (fields, hyper-parameters, container arguments)."
    if isinstance(value, dict): return [u for v in value.values() for u in s3_uris(v)]
    if isinstance(value, list): return [u for v in value for u in s3_uris(v)]
    return [value] if isinstance(value, str) and value.startswith("s3://") else []


def object_arn(uri: str, below: str = "") -> str:
    "The ARN of an object at (or below) an s3:// URI."
    bucket, _, key = uri[5:].partition("/")
    return f"arn:aws:s3:::{bucket}/" + "/".join(p for p in (key.rstrip("/"), below) if p)


def denied(policy: dict, needs) -> list:
    "The (action, resource, context) needs the policy does not allow (judged by nlpmt's own evaluator)."
    return [n for n in needs if not aws.policy_allows([policy], *n)]


def job_needs(op: str, req: dict) -> list[tuple]:
    "What the execution role must be allowed for a captured Create* request: every S3 URI in it, its log group, its image."
    kind = "training" if op == "CreateTrainingJob" else "processing"
    name = req["TrainingJobName"] if kind == "training" else req["ProcessingJobName"]
    needs = []
    for uri in s3_uris(req):
        bucket, _, key = uri[5:].partition("/")
        needs += [("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": key}),
                  ("s3:GetObject", object_arn(uri, "x"), None), ("s3:PutObject", object_arn(uri, "x"), None)]
    if kind == "training":   # SageMaker deletes the checkpoints the trainer rotates out
        needs.append(("s3:DeleteObject", object_arn(req["CheckpointConfig"]["S3Uri"], "checkpoint-1/model.safetensors"), None))
    group = f"arn:aws:logs:us-east-1:123456789012:log-group:{LOG_GROUPS[kind]}"
    needs += [("logs:CreateLogGroup", group, None), ("logs:CreateLogStream", f"{group}:log-stream:{name}/algo-1-1", None),
              ("logs:PutLogEvents", f"{group}:log-stream:{name}/algo-1-1", None)]
    image = req["AlgorithmSpecification"]["TrainingImage"] if kind == "training" else req["AppSpecification"]["ImageUri"]
    needs += [(a, aws.ecr_repository_arn(image), None) for a in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")]
    return needs


def launcher_needs(op: str, req: dict) -> list[tuple]:
    "What the workstation role must be allowed to start, follow and stop the job of a captured request."
    kind = "training" if op == "CreateTrainingJob" else "processing"
    Kind = kind.capitalize()
    name = req[f"{Kind}JobName"]
    job = f"arn:aws:sagemaker:us-east-1:123456789012:{kind}-job/{name}"
    group = f"arn:aws:logs:us-east-1:123456789012:log-group:{LOG_GROUPS[kind]}"
    return [(f"sagemaker:{verb}{Kind}Job", job, None) for verb in ("Create", "Describe", "Stop")] + \
           [("sagemaker:AddTags", job, None), ("sagemaker:ListTags", job, None),
            ("iam:PassRole", req["RoleArn"], {"iam:PassedToService": "sagemaker.amazonaws.com"}),
            ("logs:DescribeLogStreams", f"{group}:*", None), ("logs:GetLogEvents", f"{group}:log-stream:{name}/algo-1-1", None)]


def test_job_requests_stay_inside_the_generated_role_policies(store_uri, captured):
    """Every S3 location, log group and image a Training or Processing job is given, and every object the SDK uploads
    for it, is allowed by the policies `nlpmt aws policy` generates for the store: if nlpmt.sagemaker_jobs starts writing
    elsewhere (another bucket, a prefix outside the store, a new log group), this fails."""
    session, requests = captured
    uploads = []
    session.events.register("provide-client-params.s3.PutObject", lambda params, **kw: uploads.append((params["Bucket"], params["Key"])))
    session.events.register("provide-client-params.s3.CreateMultipartUpload", lambda params, **kw: uploads.append((params["Bucket"], params["Key"])))
    config = load_config(overrides=OVERRIDES)
    training = plan_jobs(OK, {"n_rows": "5"}, store=store_uri, config=config, kind="training", models=["bert-base-uncased"])[0]
    processing = plan_jobs(OK, {"n_rows": "5"}, store=store_uri, config=config)[0]
    for spec in (training, processing): submit_sagemaker(spec, config, role=ROLE, boto_session=session)
    assert [op for op, _ in requests] == ["CreateTrainingJob", "CreateProcessingJob"]

    bucket, prefix = store_uri[5:].split("/", 1)
    role_policy = aws.sagemaker_role_policy(bucket, prefix)
    ec2_policy = aws.ec2_role_policy(bucket, ROLE, prefix, project_name=config.project.name)
    assert aws.check_policy(role_policy, bucket, prefix) == [] and aws.check_policy(ec2_policy, bucket, prefix) == []
    for op, req in requests:
        uris = s3_uris(req)
        assert uris and all(u == store_uri or u.startswith(store_uri + "/") for u in uris), uris   # only the store
        # channels, code, output path, checkpoints, the store argument: all inside what the role may read and write
        assert any(u.startswith(f"{store_uri}/code/") for u in uris) and f"{store_uri}" in uris
        assert denied(role_policy, job_needs(op, req)) == []
        assert denied(ec2_policy, launcher_needs(op, req)) == []
    assert {aws.store_access(k[len(prefix) + 1:]) for _, k in uploads} == {"r"}     # code bundles land in code/ only
    upload_needs = [("s3:PutObject", f"arn:aws:s3:::{b}/{k}", None) for b, k in uploads]
    assert uploads and denied(ec2_policy, upload_needs) == []                         # the workstation uploads them
    assert denied(role_policy, [("s3:GetObject", r, c) for _, r, c in upload_needs]) == []   # the job reads them

    # the checks are not vacuous: a policy for another prefix, the first policy (Training logs only), another
    # project's workstation policy and a different execution role are all refused
    op, req = requests[1]
    assert denied(aws.sagemaker_role_policy(bucket, "elsewhere"), job_needs(op, req))
    old = aws.sagemaker_role_policy(bucket, prefix)
    for st in old["Statement"]:
        if st["Sid"] == "WriteJobLogs": st["Resource"] = [r for r in st["Resource"] if "TrainingJobs" in r]
    assert {a for a, _, _ in denied(old, job_needs(op, req))} == {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}
    assert denied(aws.ec2_role_policy(bucket, ROLE, prefix, project_name="other-project"), launcher_needs(op, req))
    other_role = aws.ec2_role_policy(bucket, "arn:aws:iam::123456789012:role/other", prefix, project_name=config.project.name)
    assert [a for a, _, _ in denied(other_role, launcher_needs(op, req))] == ["iam:PassRole"]


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
    assert "cost:" in status and "run id:" in status and "spot savings:" in status
    assert "assumed:          estimate:" in status and "typical spot" in status   # moto reports no billable seconds

    logs = boto3.client("logs")
    group = "/aws/sagemaker/TrainingJobs"
    try: logs.create_log_group(logGroupName=group)
    except logs.exceptions.ResourceAlreadyExistsException: pass   # the session's moto server is shared (container jobs log there too)
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


def test_cost_and_spot_savings_use_job_cost_once_and_say_what_they_assumed():
    # a finished managed-spot Training job: billable seconds are already discounted, so they get the on-demand rate
    st = JobStatus("j", "training", "Completed", instance_type="ml.g5.xlarge", spot=True, training_seconds=1000, billable_seconds=400)
    info = job_cost_info(st)
    assert info["spot_savings_pct"] == 60.0 and info["billable_seconds"] == 400 and not info["estimated"]
    assert info["usd"] == aws.job_cost("ml.g5.xlarge", 400, True) == pytest.approx(400 / 3600 * 1.01, abs=1e-4)
    assert info["on_demand_usd"] == aws.job_cost("ml.g5.xlarge", 1000, False) == pytest.approx(1000 / 3600 * 1.01, abs=1e-4)
    assert info["usd"] / info["on_demand_usd"] == pytest.approx(1 - info["spot_savings_pct"] / 100, abs=1e-3)
    lines = "\n".join(format_cost_lines(info))
    assert "billable seconds: 400" in lines and "cost:             $0.1122" in lines and "on demand:        $0.2806" in lines
    assert "spot savings:     60.0% (SageMaker: 1 - billable/training seconds)" in lines
    assert "on-demand $1.010/h" in lines and "already took the managed-spot discount" in lines
    # two instances: billable seconds count one instance
    assert job_cost_info(JobStatus("j", "training", "Completed", instance_type="ml.g5.xlarge", instance_count=2,
                                   training_seconds=3600, billable_seconds=3600))["usd"] == pytest.approx(2.02)
    # a spot job still running reports no billable time: wall-clock seconds at the typical spot rate, saving typical
    t0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    running = JobStatus("r", "training", "InProgress", instance_type="ml.g5.xlarge", spot=True, started=t0,
                        ended=t0 + datetime.timedelta(hours=2))
    info = job_cost_info(running)
    assert info["estimated"] and info["usd"] == pytest.approx(0.60) and info["on_demand_usd"] == pytest.approx(2.02)
    assert info["spot_savings_pct"] == pytest.approx(100 * (1 - 0.30 / 1.01), abs=0.1) and "typical" in info["spot_savings_source"]
    lines = "\n".join(format_cost_lines(info))
    assert "cost:             ~$0.6000" in lines and "typical spot $0.300/h" in lines and "no billable time until the job ends" in lines
    # a Processing job: never billable seconds, wall-clock at the on-demand rate, no spot
    proc = JobStatus("p", "processing", "Completed", instance_type="ml.m5.xlarge", started=t0, ended=t0 + datetime.timedelta(hours=1))
    info = job_cost_info(proc)
    assert info["usd"] == aws.instance_price("ml.m5.xlarge") and info["spot_savings_pct"] is None and info["on_demand_usd"] is None
    assert "a processing job reports no billable time" in info["assumption"]
    # an instance type without a price: said, not guessed
    assert "no price" in job_cost_info(JobStatus("x", "training", "Completed", instance_type="ml.x9.huge", billable_seconds=5))["note"]


@pytest.fixture
def recorded_s3(tmp_path, monkeypatch):
    "A moto server of its own that records every request it gets (to a file in tmp_path); yields (bucket, recording)."
    port, recording = free_port(), tmp_path/"moto-recording.jsonl"
    log = open(tmp_path/"moto.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent/"moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "MOTO_RECORDER_FILEPATH": str(recording)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/")
        for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"): monkeypatch.delenv(k, raising=False)
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="nlpmt-recorded")
        urllib.request.urlopen(urllib.request.Request(url + "/moto-api/recorder/start-recording", method="POST"))
        yield "nlpmt-recorded", recording
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


def recorded_s3_actions(recording: Path) -> list[tuple]:
    "(IAM action, resource, condition context) of every request in a moto recording; non-S3 requests as 'SERVICE:?'."
    out = []
    for line in recording.read_text().splitlines():
        e = json.loads(line)
        headers = {k.lower(): v for k, v in e["headers"].items()}
        scope = re.search(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request", headers.get("authorization", ""))
        if not scope or scope[1] != "s3": out.append((f"{scope[1] if scope else 'unsigned'}:?", e["url"], None)); continue
        url = urlsplit(e["url"])
        query = parse_qs(url.query, keep_blank_values=True)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        method = e["method"]
        if not key:
            if method == "POST" and "delete" in query:    # batch delete: one DeleteObject per key
                body = base64.b64decode(e["body"]).decode() if e.get("body_encoded") else e.get("body") or ""
                out += [("s3:DeleteObject", f"arn:aws:s3:::{bucket}/{k}", None) for k in re.findall(r"<Key>(.*?)</Key>", body)]
            elif method in ("GET", "HEAD") and "location" in query: out.append(("s3:GetBucketLocation", f"arn:aws:s3:::{bucket}", None))
            elif method in ("GET", "HEAD"): out.append(("s3:ListBucket", f"arn:aws:s3:::{bucket}", {"s3:prefix": query.get("prefix", [""])[0]}))
            else: out.append((f"s3:? {method} ?{url.query}", f"arn:aws:s3:::{bucket}", None))
            continue
        arn = f"arn:aws:s3:::{bucket}/{key}"
        if "x-amz-copy-source" in headers:
            out.append(("s3:GetObject", "arn:aws:s3:::" + unquote(headers["x-amz-copy-source"]).lstrip("/").split("?")[0], None))
        if method in ("GET", "HEAD"): out.append(("s3:GetObject", arn, None))
        elif method == "DELETE": out.append(("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject", arn, None))
        else: out.append(("s3:PutObject", arn, None))          # PUT object or part, POST ?uploads / ?uploadId
    return out


MODE = {"s3:GetObject": "r", "s3:PutObject": "w", "s3:AbortMultipartUpload": "w", "s3:DeleteObject": "d"}


@pytest.mark.slow
def test_local_backend_stages_into_s3_do_only_what_the_role_policies_allow(recorded_s3, ag_news_dir):
    """The real stages, run as jobs into an S3 store on a recording moto server: every request they make is S3 inside
    the store, allowed by both generated role policies (nlpmt's own evaluator, listing prefixes included) and listed
    with its operation in nlpmt.aws.JOB_STORE_ACCESS; this is where the stages' deletes show up."""
    from test_jobs import e2e_stages, check_e2e_store
    bucket, recording = recorded_s3
    uri, stages = f"s3://{bucket}/e2e", e2e_stages()
    config = load_config()
    results = []
    for stage in stages:
        results += [run_local(spec) for spec in plan_jobs(stage, store=uri, config=config, run_id="e2e-s3")]
    assert [r.status for r in results] == ["Completed"] * len(stages), [r.failure for r in results]
    check_e2e_store(S3Store(uri), "e2e-s3", stages)

    actions = recorded_s3_actions(recording)
    assert actions and not [a for a in actions if not a[0].startswith("s3:") or "?" in a[0]]   # S3 only, all understood
    policies = {"sagemaker": aws.sagemaker_role_policy(bucket, "e2e"),
                "ec2": aws.ec2_role_policy(bucket, ROLE, "e2e", project_name=config.project.name)}
    for role, policy in policies.items():
        assert denied(policy, actions) == [], role
    outside = [(a, r) for a, r, _ in actions if a in MODE and MODE[a] not in aws.store_access(r.split(f":::{bucket}/e2e/", 1)[1])]
    assert outside == [], "store keys or operations missing from nlpmt.aws.JOB_STORE_ACCESS"
    ops = {(a, r.split("/e2e/", 1)[1].split("/")[0]) for a, r, _ in actions if a in MODE}
    assert {("s3:PutObject", "data"), ("s3:GetObject", "data"), ("s3:PutObject", "results")} <= ops
    if "baseline" in stages:   # the baseline replaces its final model folder: a delete the role must allow
        assert ("s3:DeleteObject", "models") in ops
        no_delete = {**policies["sagemaker"], "Statement": [st for st in policies["sagemaker"]["Statement"]
                                                            if st["Sid"] != "ReplaceStageOutputs"]}
        assert {a for a, _, _ in denied(no_delete, actions)} == {"s3:DeleteObject"}


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

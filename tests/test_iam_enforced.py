"""IAM by enforcement: a moto server of its own with IAM checks on (`INITIAL_NO_AUTH_ACTION_COUNT`), the roles and
policies `nlpmt aws bootstrap` creates, assumed through moto's STS, and the project run with those credentials.

moto enforces actions everywhere and resources for S3 (the object ARN of every request), but it evaluates no
`Condition` (a statement with one counts as an explicit deny) and checks SageMaker and CloudWatch Logs calls against
resource "*" only. `moto_enforceable` adapts exactly those statements (listed and asserted below); the resource ARNs
and conditions it relaxes stay covered by nlpmt's own evaluator (`nlpmt.iam.policy_allows`, tests/test_aws.py and
tests/test_sagemaker_jobs.py)."""
import copy, io, json, os, re, subprocess, sys, uuid
from pathlib import Path
import boto3
import pytest
from botocore.exceptions import ClientError
from nlpmt.bootstrap import EC2_POLICY_NAME, SAGEMAKER_POLICY_NAME, aws_names, bootstrap
from nlpmt.iam import policy_allows, trusts_service
from nlpmt.cli import main
from nlpmt.core import load_config
from nlpmt.job_plan import plan_jobs
from nlpmt.local_jobs import run_local
from nlpmt.storage import S3Store, LocalStore
from conftest import free_port, _wait_http
from test_transformer import seed_store

pytestmark = pytest.mark.aws
ROOT = Path(__file__).resolve().parents[1]
OK = str(ROOT/"tests"/"notebooks"/"ok.ipynb")
SETUP_REQUESTS = 3            # unauthenticated requests moto accepts: create the admin user, its policy, its key


@pytest.fixture(scope="module")
def enforced_moto():
    "A moto server that checks IAM after its first SETUP_REQUESTS requests; yields (endpoint, admin credentials)."
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp"))/f"moto-iam-{port}.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent/"moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)},
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/")
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="admin")["AccessKey"]
        yield url, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


def use(monkeypatch, url: str, creds: dict) -> None:
    "Point boto3 (and the SDK) at the enforcing server with `creds`."
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"): monkeypatch.delenv(k, raising=False)
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                 "SAGEMAKER_VALIDATE_ROLE": "false", **creds}.items():
        monkeypatch.setenv(k, v)


# statements moto cannot judge as AWS would, and why (asserted: nothing else is changed)
MOTO_RELAXED = {"ListProjectBucket": "condition s3:prefix", "WriteJobMetrics": "condition cloudwatch:namespace",
                "PassOnlyTheSageMakerRole": "condition iam:PassedToService",
                "WriteJobLogs": "logs resources", "WriteInstanceLogs": "logs resources", "ReadJobLogs": "logs resources",
                "RunSageMakerJobs": "sagemaker resources"}


def moto_enforceable(policy: dict) -> tuple[dict, set]:
    "The policy with Conditions dropped and non-S3 resources widened to '*' (what moto can check); the Sids changed."
    out, changed = copy.deepcopy(policy), set()
    for st in out["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        if st.pop("Condition", None) is not None: changed.add(st["Sid"])
        if any(a.split(":")[0] in ("sagemaker", "logs") for a in actions) and st["Resource"] != "*":
            st["Resource"] = "*"; changed.add(st["Sid"])
    return out, changed


@pytest.fixture(scope="module")
def project(enforced_moto, tmp_path_factory):
    "Bucket and roles from `bootstrap` (as the admin), their policies made moto-checkable, both roles assumed."
    url, admin = enforced_moto
    mp = pytest.MonkeyPatch()
    use(mp, url, admin)
    try:
        bucket, prefix = f"nlpmt-iam-{uuid.uuid4().hex[:8]}", "proj"
        config = load_config()
        done = bootstrap(config, bucket, prefix, write_config=False)
        admin_session = boto3.session.Session(aws_access_key_id=admin["AWS_ACCESS_KEY_ID"], region_name="us-east-1",
                                              aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"])   # not boto3's cached default
        iam, sts = admin_session.client("iam", endpoint_url=url), admin_session.client("sts", endpoint_url=url)
        names = aws_names(config.project.name)
        relaxed = set()
        for role, policy_name in ((names.sagemaker_role, SAGEMAKER_POLICY_NAME), (names.ec2_role, EC2_POLICY_NAME)):
            doc = iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
            doc = json.loads(doc) if isinstance(doc, str) else doc
            checkable, changed = moto_enforceable(doc)
            relaxed |= changed
            iam.put_role_policy(RoleName=role, PolicyName=policy_name, PolicyDocument=json.dumps(checkable))
        assert relaxed == set(MOTO_RELAXED)
        # in AWS the service (SageMaker, EC2) assumes the role; here the admin stands in for it, so it must be trusted
        admin_arn = sts.get_caller_identity()["Arn"]
        for role, service in ((names.sagemaker_role, "sagemaker.amazonaws.com"), (names.ec2_role, "ec2.amazonaws.com")):
            trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
            assert trusts_service(json.loads(trust) if isinstance(trust, str) else trust, service)
            iam.update_assume_role_policy(RoleName=role, PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": admin_arn}, "Action": "sts:AssumeRole"}]}))
        creds = {}
        for who, arn in (("execution", done["sagemaker_role_arn"]), ("workstation", done["ec2_role_arn"])):
            c = sts.assume_role(RoleArn=arn, RoleSessionName=f"nlpmt-{who}")["Credentials"]
            creds[who] = {"AWS_ACCESS_KEY_ID": c["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": c["SecretAccessKey"],
                          "AWS_SESSION_TOKEN": c["SessionToken"]}
        admin_session.client("s3", endpoint_url=url).create_bucket(Bucket=f"{bucket}-other")   # someone else's bucket
        yield {"url": url, "bucket": bucket, "uri": f"s3://{bucket}/{prefix}", "role": done["sagemaker_role_arn"],
               "creds": creds, "admin": admin}
    finally:
        mp.undo()


def s3_as(project: dict, who: str):
    c = project["creds"][who]
    return boto3.client("s3", endpoint_url=project["url"], region_name="us-east-1", aws_access_key_id=c["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=c["AWS_SECRET_ACCESS_KEY"], aws_session_token=c["AWS_SESSION_TOKEN"])


def denied(call) -> bool:
    "True when the call fails with AccessDenied."
    try: call()
    except ClientError as e:   # moto answers JSON services (SageMaker, Logs) with a bare 403
        return e.response["Error"]["Code"] in ("AccessDenied", "AccessDeniedException", "403") \
            or e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    return False


@pytest.mark.parametrize("who", ["execution", "workstation"])
def test_writes_outside_the_store_and_deletes_outside_stage_outputs_are_denied(project, who):
    s3, bucket = s3_as(project, who), project["bucket"]
    s3.put_object(Bucket=bucket, Key="proj/results/allowed.txt", Body=b"ok")                 # inside the store: allowed
    assert s3.get_object(Bucket=bucket, Key="proj/results/allowed.txt")["Body"].read() == b"ok"
    assert denied(lambda: s3.put_object(Bucket=f"{bucket}-other", Key="proj/x.txt", Body=b"x"))     # another bucket
    assert denied(lambda: s3.put_object(Bucket=bucket, Key="elsewhere/x.txt", Body=b"x"))          # another prefix
    assert denied(lambda: s3.get_object(Bucket=bucket, Key="elsewhere/x.txt"))
    assert denied(lambda: s3.delete_object(Bucket=bucket, Key="proj/results/allowed.txt"))         # no --allow-delete
    s3.put_object(Bucket=bucket, Key="proj/models/final/m/old.bin", Body=b"x")
    s3.delete_object(Bucket=bucket, Key="proj/models/final/m/old.bin")                      # stages replace these
    client = lambda service: boto3.client(service, endpoint_url=project["url"], region_name="us-east-1",
                                          **{k.lower(): v for k, v in project["creds"][who].items()})
    assert denied(lambda: client("iam").list_roles())
    if who == "execution": assert denied(lambda: client("sagemaker").list_training_jobs())   # enforced for SageMaker too
    else: client("sagemaker").list_training_jobs()                                        # the workstation launches jobs


@pytest.mark.slow
def test_the_project_runs_with_the_bootstrapped_roles(project, tmp_path, monkeypatch, capsys):
    """Workstation role: sync up, `run --backend sagemaker`, `jobs status`/`logs`, the container backend's submission,
    sync down. Execution role: the local backend's job and the container job (and what the platform does for it)."""
    url, uri, role = project["url"], project["uri"], project["role"]
    local = LocalStore(tmp_path/"local")
    seed_store(local, n=30)
    use(monkeypatch, url, project["creds"]["workstation"])
    assert main(["sync", "up", uri, "--local", str(local.root), "-q"]) == 0
    assert S3Store(uri).exists("data/processed/data_report.json")
    capsys.readouterr()
    assert main(["run", OK, "--backend", "sagemaker", "--job-type", "training", "--store", uri, "--role", role]) == 0
    name = capsys.readouterr().out.splitlines()[0]
    assert main(["jobs", "status", name]) == 0 and "status:           Completed" in capsys.readouterr().out
    assert main(["jobs", "logs", name]) == 0

    config = load_config()
    use(monkeypatch, url, project["creds"]["execution"])                 # a local job, as the execution role
    spec = plan_jobs(OK, {"n_rows": "4"}, store=uri, config=config)[0]
    assert run_local(spec).status == "Completed"
    assert S3Store(uri).read_json("results/fixture/ok-tiny.json")["n_rows"] == 4

    use(monkeypatch, url, project["creds"]["workstation"])               # container: submitted by the workstation,
    from nlpmt.container import run_container                            # run and served as the execution role
    spec = plan_jobs(OK, {"n_rows": "5"}, store=uri, config=config, kind="training")[0]
    res = run_container(spec, config, out=io.StringIO(), role=role, credentials=project["creds"]["execution"])
    assert res.status == "Completed", res.failure
    assert S3Store(uri).read_json("results/fixture/ok-tiny.json")["n_rows"] == 5
    assert S3Store(uri).exists(f"models/output/{res.job_name}/output/model.tar.gz")

    down = tmp_path/"down"
    assert main(["sync", "down", uri, "--local", str(down), "-q"]) == 0
    assert json.loads((down/"results/fixture/ok-tiny.json").read_text())["n_rows"] == 5

"""The AWS side through the `nlpmt aws`, `nlpmt cost` and `nlpmt doctor` commands and the modules behind them
(nlpmt.costs, nlpmt.job_resources, nlpmt.iam, nlpmt.bootstrap, nlpmt.ec2, nlpmt.doctor): prices and costs,
least-privilege policies, bootstrap, EC2, budgets, doctor and the EC2 user-data script, every AWS call against the
moto server on 127.0.0.1."""
import base64, datetime, hashlib, io, json, os, shlex, shutil, signal, stat, subprocess, sys, time, urllib.error
import urllib.request, uuid
from pathlib import Path
import pytest, yaml
from nlpmt.costs import PRICE_COLUMNS, instance_price, job_cost, price_table
from nlpmt.job_resources import JOB_LOG_GROUPS, JOB_STORE_ACCESS
from nlpmt.iam import as_list, check_policy, policy_allows, sagemaker_job_needs, sagemaker_role_policy, trust_policy
from nlpmt.bootstrap import EC2_POLICY_NAME, SAGEMAKER_POLICY_NAME, set_yaml_scalars
from nlpmt.ec2 import DLAMI_NAME_PATTERN, find_dlami, render_user_data
from nlpmt.cli import main
from nlpmt.core import sha256_bytes
from nlpmt.storage import LocalStore, S3Store
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    "Run the nlpmt CLI in-process; returns (exit code, stdout, stderr)."
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def project(tmp_path):
    "A scratch project: a copy of the repo's configs/ with a unique project name (so IAM names never collide)."
    shutil.copytree(ROOT/"configs", tmp_path/"configs")
    set_yaml_scalars(tmp_path/"configs"/"project.yaml", {"name": f"t-{uuid.uuid4().hex[:8]}"})
    return tmp_path


def boto(service):
    "A client for the moto server (the aws_env fixture set the endpoint)."
    from nlpmt.storage import boto_client
    return boto_client(service, "us-east-1")


# ---------------------------------------------------------------- prices and costs

def test_price_table_has_the_required_prices():
    want = {"ml.p3.2xlarge": (3.06, 0.90), "ml.p3.8xlarge": (12.24, 3.67), "ml.g5.xlarge": (1.01, 0.30),
            "ml.g5.2xlarge": (1.21, 0.36)}
    for t, (on_demand, spot) in want.items():
        assert instance_price(t) == on_demand and instance_price(t, spot=True) == spot
        assert instance_price(t[3:]) > 0 and instance_price(t[3:], spot=True) < instance_price(t[3:])  # EC2 twin
    assert instance_price("ml.m5.xlarge") > 0 and instance_price("m5.xlarge") > 0
    assert job_cost("ml.p3.2xlarge", 7200) == pytest.approx(6.12)
    # SageMaker billable seconds of a managed spot job are already discounted: no second discount
    assert job_cost("ml.g5.xlarge", 3600, spot=True) == pytest.approx(1.01)
    assert job_cost("ml.g5.xlarge", 3600, spot=True, discounted=False) == pytest.approx(0.30)
    assert job_cost("g5.2xlarge", 1800, spot=True) == pytest.approx(0.18)
    assert job_cost("ml.p3.8xlarge", 3600, instance_count=2) == pytest.approx(24.48)
    with pytest.raises(ValueError, match="billable_seconds"): job_cost("ml.g5.xlarge", -1)


def test_cost_estimate_cli(capsys):
    rc, out, _ = run(capsys, "cost", "estimate", "--instance-type", "ml.p3.2xlarge", "--hours", "2", "--spot", "--models", "3")
    assert rc == 0 and "$0.90/h × 2 h × 3 model(s) = $5.40" in out and "$18.36" in out
    rc, out, _ = run(capsys, "cost", "estimate", "--instance-type", "ml.g5.2xlarge", "--hours", "2.5", "--json")
    assert rc == 0 and json.loads(out)["usd_total"] == pytest.approx(3.02)
    rc, _, err = run(capsys, "cost", "estimate", "--instance-type", "g5.xlarge", "--hours", "0")
    assert rc == 1 and "--hours must be > 0" in err
    rc, _, err = run(capsys, "cost", "estimate", "--instance-type", "ml.x9.huge", "--hours", "1")
    assert rc == 1 and "instance_prices.csv" in err and "ml.g5.xlarge" in err
    rc, out, _ = run(capsys, "cost", "prices")
    assert rc == 0 and "ml.p3.8xlarge" in out and "$12.240" in out


def test_bad_price_table_names_file_line_and_field(tmp_path):
    f = tmp_path/"prices.csv"
    f.write_text("# comment\n" + ",".join(PRICE_COLUMNS) + "\nml.g5.xlarge,sagemaker,1.01,0.3,1,A10G,4,16\n"
                 "g5.xlarge,sagemaker,1.0,0.3,1,A10G,4,16\n")
    with pytest.raises(ValueError, match=r"prices.csv: line 4: service sagemaker does not match"):
        price_table(str(f))


# ---------------------------------------------------------------- IAM policies

def statements(doc):
    return {s.get("Sid"): s for s in doc["Statement"]}


def test_policies_are_least_privilege(capsys, tmp_path):
    rc, out, _ = run(capsys, "aws", "policy", "sagemaker", "--bucket", "my-bucket", "--prefix", "proj", "--config-dir", ROOT/"configs")
    doc = json.loads(out)
    perms, trust = doc["permissions"], doc["trust"]
    assert rc == 0 and check_policy(perms, "my-bucket", "proj") == []
    assert trust["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    s3 = [s for s in perms["Statement"] if any(str(a).startswith("s3:") for a in as_list(s["Action"]))]
    replaced = {f"arn:aws:s3:::my-bucket/proj/{p}/*" for p in ("models/final", "models/checkpoints", "figures/results")}
    assert {r for s in s3 for r in as_list(s["Resource"])} == {"arn:aws:s3:::my-bucket", "arn:aws:s3:::my-bucket/proj/*"} | replaced
    # delete only where stages replace their own outputs (final models, rotated checkpoints, stale report figures)
    deleting = [s for s in s3 if "s3:DeleteObject" in as_list(s["Action"])]
    assert [s["Sid"] for s in deleting] == ["ReplaceStageOutputs"] and set(deleting[0]["Resource"]) == replaced
    sts = statements(perms)
    assert "ecr:BatchGetImage" in sts["PullImages"]["Action"] and "logs:PutLogEvents" in sts["WriteJobLogs"]["Action"]
    assert sts["PullImages"]["Resource"] == ["arn:aws:ecr:*:*:repository/pytorch-training"]
    # both job kinds' log groups (and nothing else under /aws/sagemaker), metrics in the same two namespaces
    groups = {r.split(":log-group:")[1].split(":")[0] for r in sts["WriteJobLogs"]["Resource"]}
    assert groups == {"/aws/sagemaker/TrainingJobs", "/aws/sagemaker/ProcessingJobs"}
    assert set(sts["WriteJobMetrics"]["Condition"]["StringEquals"]["cloudwatch:namespace"]) == groups
    assert sts["ListProjectBucket"]["Condition"] == {"StringLike": {"s3:prefix": ["proj", "proj/*"]}}

    role = "arn:aws:iam::123456789012:role/x-sagemaker-execution"
    rc, out, _ = run(capsys, "aws", "policy", "ec2", "--bucket", "my-bucket", "--sagemaker-role-arn", role,
                     "--part", "permissions", "--config-dir", ROOT/"configs")
    ec2 = json.loads(out)
    assert rc == 0 and check_policy(ec2, "my-bucket") == []
    passrole = statements(ec2)["PassOnlyTheSageMakerRole"]
    assert passrole["Resource"] == role and passrole["Condition"]["StringEquals"]["iam:PassedToService"] == "sagemaker.amazonaws.com"
    run_jobs = statements(ec2)["RunSageMakerJobs"]
    assert {"sagemaker:CreateTrainingJob", "sagemaker:CreateProcessingJob", "sagemaker:StopTrainingJob", "sagemaker:AddTags",
            "sagemaker:DescribeProcessingJob"} <= set(run_jobs["Action"])
    project = yaml.safe_load((ROOT/"configs"/"project.yaml").read_text())["name"]
    # the account (from the role ARN) and the region (project.region) are known: every job and log ARN names them
    assert run_jobs["Resource"] == [f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{project}-*",
                                    f"arn:aws:sagemaker:us-east-1:123456789012:processing-job/{project}-*"]
    assert all(r.startswith("arn:aws:logs:us-east-1:123456789012:log-group:")
               for s in ("ReadJobLogs", "WriteInstanceLogs") for r in statements(ec2)[s]["Resource"])
    assert {r.split(":log-group:")[1].split(":")[0] for r in statements(ec2)["ReadJobLogs"]["Resource"]} == \
        {"/aws/sagemaker/TrainingJobs", "/aws/sagemaker/ProcessingJobs"}
    rc, out, _ = run(capsys, "aws", "policy", "ec2", "--bucket", "my-bucket", "--part", "trust", "--config-dir", ROOT/"configs")
    assert json.loads(out)["Statement"][0]["Principal"]["Service"] == "ec2.amazonaws.com"
    # --allow-delete adds exactly s3:DeleteObject on the objects, and the checker accepts it only when allowed
    deleting = sagemaker_role_policy("my-bucket", allow_delete=True)
    assert "s3:DeleteObject" in statements(deleting)["ReadWriteProjectObjects"]["Action"]
    assert check_policy(deleting, "my-bucket", allow_delete=True) == []
    assert check_policy(deleting, "my-bucket") == ["statement ReadWriteProjectObjects: S3 action 's3:deleteobject' is only "
                                                       "needed below figures/results/, models/final/, models/checkpoints/ (or everywhere with --allow-delete)"]
    # a custom image: pulls only from its repository
    custom = sagemaker_role_policy("my-bucket", image_uri="123456789012.dkr.ecr.eu-west-1.amazonaws.com/nlpmt:1")
    assert statements(custom)["PullImages"]["Resource"] == ["arn:aws:ecr:eu-west-1:123456789012:repository/nlpmt"]


def test_generated_policy_covers_every_job_need_and_the_doctor_notices_a_missing_one():
    needs = sagemaker_job_needs("my-bucket", "proj")
    policy = sagemaker_role_policy("my-bucket", "proj")
    assert all(policy_allows([policy], a, r) for a, r in needs)
    # every store prefix in the shared definition, both log groups and the image repository are needs
    assert {r.split("/proj/")[1].rsplit("/", 1)[0] for a, r in needs if a.startswith("s3:") and "/proj/" in r} == set(JOB_STORE_ACCESS)
    assert {r.split(":log-group:")[1].split(":")[0] for a, r in needs if a.startswith("logs:")} == set(JOB_LOG_GROUPS.values())
    # the policy as first written: logs only for Training jobs; Processing jobs could not write theirs
    old = sagemaker_role_policy("my-bucket", "proj")
    statements(old)["WriteJobLogs"]["Resource"] = [r for r in statements(old)["WriteJobLogs"]["Resource"] if "TrainingJobs" in r]
    missing = [(a, r) for a, r in needs if not policy_allows([old], a, r)]
    assert missing and all("/aws/sagemaker/ProcessingJobs" in r for _, r in missing)
    assert {a for a, _ in missing} == {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"}
    # no delete outside the replaced outputs, no listing outside the prefix
    assert not policy_allows([policy], "s3:DeleteObject", "arn:aws:s3:::my-bucket/proj/results/baseline/logreg_metrics.json")
    assert not policy_allows([policy], "s3:DeleteObject", "arn:aws:s3:::my-bucket/proj/data/processed/train_4class.csv")
    assert policy_allows([policy], "s3:ListBucket", "arn:aws:s3:::my-bucket", {"s3:prefix": "proj/code/x"})
    assert not policy_allows([policy], "s3:ListBucket", "arn:aws:s3:::my-bucket", {"s3:prefix": "other/"})


@pytest.mark.parametrize("planted, message", [
    ({"Sid": "Planted", "Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::my-bucket/*"}, "allows a whole service"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}, "wider than one bucket"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*"}, "more than one bucket"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::other/*"}, "outside bucket"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::my-bucket/*"}, "wildcard S3 action"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "*", "Resource": "*"}, "allows a whole service"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "iam:PassRole", "Resource": "*"}, "iam:PassRole on any role"),
    ({"Sid": "Planted", "Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}, "NotAction"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "s3:DeleteObject", "Resource": "arn:aws:s3:::my-bucket/results/*"}, "only needed below"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "logs:PutLogEvents", "Resource": "arn:aws:logs:*:*:log-group:*"}, "wider than the jobs' log groups"),
    ({"Sid": "Planted", "Effect": "Allow", "Action": "sagemaker:StopTrainingJob", "Resource": "arn:aws:sagemaker:*:*:training-job/*"}, "on every job"),
])
def test_check_policy_flags_planted_over_broad_statement(capsys, tmp_path, planted, message):
    doc = sagemaker_role_policy("my-bucket")
    good = tmp_path/"good.json"; good.write_text(json.dumps(doc))
    rc, out, _ = run(capsys, "aws", "check-policy", good, "--bucket", "my-bucket")
    assert rc == 0 and "least privilege" in out
    doc["Statement"].append(planted)
    bad = tmp_path/"bad.json"; bad.write_text(json.dumps(doc))
    rc, out, _ = run(capsys, "aws", "check-policy", bad, "--bucket", "my-bucket")
    assert rc == 1 and "statement Planted" in out and message in out


def test_check_policy_rejects_bad_json(capsys, tmp_path):
    f = tmp_path/"p.json"; f.write_text("{not json")
    rc, _, err = run(capsys, "aws", "check-policy", f)
    assert rc == 1 and "p.json: not valid JSON" in err


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_is_idempotent_and_repairs_drift(aws_env, project, capsys):
    repo_yaml = (ROOT/"configs"/"project.yaml").read_bytes()
    cfg = project/"configs"/"project.yaml"
    before = cfg.read_text()
    bucket = f"nlpmt-boot-{uuid.uuid4().hex[:10]}"
    rc, out, err = run(capsys, "aws", "bootstrap", "--bucket", bucket, "--config-dir", project/"configs", "--json")
    assert rc == 0, err
    first = json.loads(out)
    assert any(a.startswith("created bucket") for a in first["actions"]) and first["config_changed"] == ["role_arn", "bucket"]
    name = yaml.safe_load(cfg.read_text())["name"]
    assert first["sagemaker_role_arn"] == f"arn:aws:iam::123456789012:role/{name}-sagemaker-execution"

    # the config file: the two values changed, every comment and every other line kept
    after = cfg.read_text()
    assert yaml.safe_load(after)["role_arn"] == first["sagemaker_role_arn"] and yaml.safe_load(after)["bucket"] == bucket
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert len(before.splitlines()) == len(after.splitlines()) and [a.split(":")[0] for a, _ in changed] == ["role_arn", "bucket"]
    assert all(b.endswith(a[a.index("#"):]) for a, b in changed)        # trailing comments kept
    assert (ROOT/"configs"/"project.yaml").read_bytes() == repo_yaml      # the repo's configs untouched

    s3, iam = boto("s3"), boto("iam")
    assert all(s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values())
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    role = f"{name}-sagemaker-execution"
    trust = iam.get_role(RoleName=role)["Role"]["AssumeRolePolicyDocument"]
    assert trust == trust_policy("sagemaker.amazonaws.com", "123456789012", "us-east-1")
    assert trust["Statement"][0]["Condition"] == {"StringEquals": {"aws:SourceAccount": "123456789012"},
                                                  "ArnLike": {"aws:SourceArn": "arn:aws:sagemaker:us-east-1:123456789012:*"}}
    assert "Condition" not in iam.get_role(RoleName=f"{name}-ec2")["Role"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert iam.get_role_policy(RoleName=role, PolicyName=SAGEMAKER_POLICY_NAME)["PolicyDocument"] == \
        sagemaker_role_policy(bucket, region="us-east-1", account="123456789012")
    profile = iam.get_instance_profile(InstanceProfileName=f"{name}-ec2")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [f"{name}-ec2"]
    ec2_doc = iam.get_role_policy(RoleName=f"{name}-ec2", PolicyName=EC2_POLICY_NAME)["PolicyDocument"]
    assert statements(ec2_doc)["PassOnlyTheSageMakerRole"]["Resource"] == first["sagemaker_role_arn"]

    # a second run changes nothing, in AWS or in the file
    rc, out, _ = run(capsys, "aws", "bootstrap", "--bucket", bucket, "--config-dir", project/"configs", "--json")
    second = json.loads(out)
    assert rc == 0 and second["config_changed"] == [] and cfg.read_text() == after
    assert not [a for a in second["actions"] if any(w in a for w in ("created", "set ", "updated", "added", "blocked all", "turned on"))]

    # drift is repaired: public access opened, a policy widened
    s3.delete_public_access_block(Bucket=bucket)
    iam.put_role_policy(RoleName=role, PolicyName=SAGEMAKER_POLICY_NAME, PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    rc, out, _ = run(capsys, "aws", "bootstrap", "--bucket", bucket, "--config-dir", project/"configs")
    assert rc == 0 and "blocked all public access" in out and f"updated policy {SAGEMAKER_POLICY_NAME}" in out
    assert check_policy(iam.get_role_policy(RoleName=role, PolicyName=SAGEMAKER_POLICY_NAME)["PolicyDocument"], bucket) == []

    rc, _, err = run(capsys, "aws", "bootstrap", "--bucket", "Bad_Bucket", "--config-dir", project/"configs")
    assert rc == 1 and "--bucket 'Bad_Bucket' is not a valid S3 bucket name" in err
    rc, _, err = run(capsys, "aws", "bootstrap", "--bucket", "ab", "--config-dir", project/"configs")
    assert rc == 1 and "is too short (2 characters; at least 3)" in err and "S3 bucket names are 3-63 characters" in err


def test_bootstrap_require_tls_denies_plain_http(aws_env, project, capsys):
    bucket = f"nlpmt-tls-{uuid.uuid4().hex[:10]}"
    s3 = boto("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Theirs", "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteBucket", "Resource": f"arn:aws:s3:::{bucket}"}]}))
    rc, out, err = run(capsys, "aws", "bootstrap", "--bucket", bucket, "--require-tls", "--no-write-config", "--config-dir", project/"configs")
    assert rc == 0 and "bucket policy requires TLS" in out, err
    sids = [s["Sid"] for s in json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"]]
    assert sids == ["Theirs", "NlpmtDenyInsecureTransport"]                 # the existing statement is kept
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError, match="403|AccessDenied|Forbidden"):   # the moto endpoint is plain http
        s3.put_object(Bucket=bucket, Key="x", Body=b"x")
    assert yaml.safe_load((project/"configs"/"project.yaml").read_text())["role_arn"] is None   # --no-write-config


def test_set_yaml_scalars_refuses_ambiguous_edits(tmp_path):
    f = tmp_path/"p.yaml"
    f.write_text("role_arn: null\nrole_arn: x\n")
    with pytest.raises(Exception, match="appears 2 times"): set_yaml_scalars(f, {"role_arn": "a"})
    f.write_text("name: x   # the name\n")
    assert set_yaml_scalars(f, {"bucket": "b-1"}) == ["bucket"]
    assert f.read_text() == "name: x   # the name\nbucket: b-1\n"
    assert set_yaml_scalars(f, {"name": "it's: #1"}) == ["name"]
    assert yaml.safe_load(f.read_text())["name"] == "it's: #1" and "# the name" in f.read_text()


# ---------------------------------------------------------------- EC2

def make_dlamis(ec2, names):
    "Register AMIs in the moto account by imaging a throw-away instance (so they carry an architecture)."
    base = next(i for i in ec2.describe_images(Owners=["amazon"])["Images"] if i.get("Architecture") == "x86_64")
    inst = ec2.run_instances(ImageId=base["ImageId"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    ids = {n: ec2.create_image(InstanceId=inst, Name=n)["ImageId"] for n in names}
    ec2.terminate_instances(InstanceIds=[inst])
    return ids


def test_ec2_launch_list_connect_terminate(aws_env, project, capsys):
    cfgdir = project/"configs"
    bucket = f"nlpmt-ec2-{uuid.uuid4().hex[:10]}"
    assert run(capsys, "aws", "bootstrap", "--bucket", bucket, "--config-dir", cfgdir)[0] == 0
    name = yaml.safe_load((cfgdir/"project.yaml").read_text())["name"]
    ec2 = boto("ec2")
    tag = uuid.uuid4().hex[:6]   # AMIs in the shared moto account: unique names, searched by a narrowed pattern
    ids = make_dlamis(ec2, [f"Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.4.1 (Ubuntu 22.04) 20241001 {tag}",
                            f"Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.5.1 (Ubuntu 22.04) 20250301 {tag}",
                            f"Deep Learning AMI Neuron PyTorch 1.13 (Ubuntu 22.04) 20250401 {tag}",
                            f"Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250501 {tag}"])
    newest = ids[f"Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.5.1 (Ubuntu 22.04) 20250301 {tag}"]
    found = find_dlami(ec2, pattern=DLAMI_NAME_PATTERN + tag, owners=["self"])
    assert found["ImageId"] == newest                     # newest PyTorch/Ubuntu build; Neuron and Base skipped

    ec2.create_key_pair(KeyName=f"k-{tag}")
    rc, out, err = run(capsys, "aws", "ec2", "launch", "--spot", "--instance-type", "g5.xlarge", "--key-name", f"k-{tag}",
                       "--ami", newest, "--ssh-cidr", "203.0.113.7/32", "--config-dir", cfgdir, "--json")
    assert rc == 0, err
    launched = json.loads(out)
    iid = launched["instance_id"]
    assert launched["usd_per_hour"] == 0.30 and launched["store"] == f"s3://{bucket}"
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["InstanceType"] == "g5.xlarge" and inst["ImageId"] == newest and inst.get("InstanceLifecycle") == "spot"
    assert inst["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{name}-ec2")
    assert inst["KeyName"] == f"k-{tag}"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["nlpmt:project"] == name and tags["owner"] == "research"
    user_data = base64.b64decode(ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")["UserData"]["Value"]).decode()
    assert user_data.startswith("#!/usr/bin/env bash") and f"export NLPMT_STORE=s3://{bucket}" in user_data
    assert "jupyterlab --no-browser --ip=127.0.0.1" in user_data and "export NLPMT_USER=ubuntu" in user_data
    group = ec2.describe_security_groups(GroupIds=launched["security_groups"])["SecurityGroups"][0]
    assert [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in group["IpPermissions"]] == [(22, ["203.0.113.7/32"])]

    # the default AMI search (owner "amazon" in moto has no PyTorch DLAMI) fails with a clear message
    rc, _, err = run(capsys, "aws", "ec2", "launch", "--config-dir", cfgdir)
    assert rc == 1 and "no x86_64 AMI named like" in err and "--ami" in err
    rc, _, err = run(capsys, "aws", "ec2", "launch", "--ami", newest, "--ssh-cidr", "0.0.0.0/0", "--config-dir", cfgdir)
    assert rc == 1 and "use your own IP/32" in err

    rc, out, _ = run(capsys, "aws", "ec2", "list", "--config-dir", cfgdir)
    assert rc == 0 and iid in out and "spot" in out and "$0.30/h" in out
    rc, out, _ = run(capsys, "aws", "ec2", "connect", iid, "--config-dir", cfgdir)
    host = inst.get("PublicDnsName") or inst["PublicIpAddress"]
    assert rc == 0 and f"ssh -i ~/.ssh/k-{tag}.pem -N -L 8888:127.0.0.1:8888 ubuntu@{host}" in out
    assert "/home/ubuntu/nlpmt/.jupyter_token" in out and "http://127.0.0.1:8888/lab?token=" in out

    # instances nlpmt did not launch are never touched
    base = next(i for i in ec2.describe_images(Owners=["amazon"])["Images"] if i.get("Architecture") == "x86_64")
    foreign = ec2.run_instances(ImageId=base["ImageId"], MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    rc, _, err = run(capsys, "aws", "ec2", "terminate", foreign, "--config-dir", cfgdir)
    assert rc == 1 and "refusing" in err
    assert ec2.describe_instances(InstanceIds=[foreign])["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
    ec2.terminate_instances(InstanceIds=[foreign])

    rc, out, _ = run(capsys, "aws", "ec2", "terminate", iid, "--config-dir", cfgdir)
    assert rc == 0 and out.strip() in (f"{iid}: shutting-down", f"{iid}: terminated")
    rc, out, _ = run(capsys, "aws", "ec2", "list", "--json", "--config-dir", cfgdir)
    assert iid not in [r["instance_id"] for r in json.loads(out)]
    rc, _, err = run(capsys, "aws", "ec2", "connect", "i-notanid", "--config-dir", cfgdir)
    assert rc == 1 and "not an EC2 instance id" in err


def test_ec2_launch_needs_bootstrap_first(aws_env, project, capsys):
    rc, _, err = run(capsys, "aws", "ec2", "launch", "--store", "s3://some-bucket/p", "--ami", "ami-12345678",
                     "--config-dir", project/"configs")
    assert rc == 1 and "run `nlpmt aws bootstrap --bucket BUCKET` first" in err


def test_user_data_quotes_parameters(tmp_path):
    evil = "x'; touch pwned; echo '$(touch pwned2)"
    script = render_user_data({"NLPMT_SRC": evil, "PORT": 8888})
    exports = "\n".join(l for l in script.splitlines() if l.startswith("export "))
    out = subprocess.run(["bash", "-c", exports + '\nprintf %s "$NLPMT_SRC"'], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout == evil and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="not an environment variable name"): render_user_data({"A;B": "1"})


# ---------------------------------------------------------------- budgets

def test_budget_with_alerts(aws_env, project, capsys):
    name = f"b-{uuid.uuid4().hex[:8]}"
    rc, out, err = run(capsys, "aws", "budget", "--limit", "250", "--email", "lead@example.com", "--name", name,
                       "--config-dir", project/"configs")
    assert rc == 0 and f"created budget {name}" in out, err
    budgets = boto("budgets")
    b = budgets.describe_budget(AccountId="123456789012", BudgetName=name)["Budget"]
    assert float(b["BudgetLimit"]["Amount"]) == 250 and b["TimeUnit"] == "MONTHLY" and b["BudgetType"] == "COST"
    notes = budgets.describe_notifications_for_budget(AccountId="123456789012", BudgetName=name)["Notifications"]
    assert sorted((n["NotificationType"], n["Threshold"]) for n in notes) == [("ACTUAL", 80.0), ("FORECASTED", 100.0)]
    # re-running points the same two alerts at the new address
    rc, out, _ = run(capsys, "aws", "budget", "--limit", "250", "--email", "team@example.com", "--name", name,
                     "--config-dir", project/"configs")
    assert rc == 0 and "exists" in out and "goes to team@example.com" in out
    assert len(budgets.describe_notifications_for_budget(AccountId="123456789012", BudgetName=name)["Notifications"]) == 2
    rc, _, err = run(capsys, "aws", "budget", "--limit", "250", "--email", "not-an-email", "--config-dir", project/"configs")
    assert rc == 1 and "is not an e-mail address" in err
    rc, _, err = run(capsys, "aws", "budget", "--limit", "-5", "--email", "a@example.com", "--config-dir", project/"configs")
    assert rc == 1 and "--limit must be a positive amount" in err


# ---------------------------------------------------------------- doctor

def write_processed(store, overlapping=0):
    "A small processed dataset following the data contract (splits + report with their SHA-256)."
    labels = ["World", "Sports"]
    splits = {}
    for split, n in (("train", 8), ("val", 2), ("test", 2)):
        body = "text,label\n" + "".join(f"{split} text {i},{labels[i % 2]}\n" for i in range(n))
        key = f"data/processed/{split}_2class.csv"
        store.write_bytes(key, body.encode())
        splits[split] = {"key": key, "rows": n, "sha256": sha256_bytes(body.encode()),
                         "class_counts": {l: n // 2 for l in labels}}
    store.write_json("data/processed/data_report.json", {
        "labels": labels, "n_classes": 2, "splits": splits, "leakage": {"checked": True, "overlapping_texts": overlapping}})


def doctor(capsys, project, store):
    "Run `nlpmt doctor --json`; returns (exit code, {check name prefix: check})."
    rc, out, err = run(capsys, "doctor", "--store", store, "--config-dir", project/"configs", "--json")
    checks = json.loads(out)
    return rc, {c["name"].split(" ")[0] if c["name"].startswith(("bucket", "sync")) else c["name"]: c for c in checks}


def apply_fix(capsys, fix):
    "Run a suggested `nlpmt ...` fix command."
    argv = shlex.split(fix)
    assert argv[0] == "nlpmt"
    rc, out, err = run(capsys, *argv[1:])
    assert rc == 0, err


def test_doctor_turns_each_cross_into_a_tick(aws_env, project, capsys, monkeypatch):
    bucket = f"nlpmt-doc-{uuid.uuid4().hex[:10]}"
    uri = f"s3://{bucket}/proj"
    local = LocalStore(project/"store")

    # configs: a planted unknown key is named with its file; removing it fixes the check
    baseline_yaml = project/"configs"/"models_baseline.yaml"
    good = baseline_yaml.read_text()
    baseline_yaml.write_text(good + "bogus_key: 1\n")
    rc, checks = doctor(capsys, project, uri)
    assert rc == 1 and list(checks) == ["configs valid"] and not checks["configs valid"]["ok"]
    assert "models_baseline.yaml" in checks["configs valid"]["detail"] and "bogus_key" in checks["configs valid"]["detail"]
    baseline_yaml.write_text(good)

    # no credentials: everything AWS fails, with the credentials fix
    saved = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    for k in saved: monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(project/"none")); monkeypatch.setenv("AWS_CONFIG_FILE", str(project/"none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    rc, checks = doctor(capsys, project, uri)
    assert rc == 1 and checks["configs valid"]["ok"]
    assert [c["ok"] for c in checks.values()] == [True, False, False, False, False, False, False]
    assert "aws configure" in checks["AWS credentials and region"]["fix"]
    assert "nlpmt run data" in checks["processed data"]["fix"] and "nlpmt run baseline" in checks["local baseline results"]["fix"]

    # processed data: leakage in the report is a ✗ until the data is fixed; baseline results appear
    write_processed(local, overlapping=3)
    rc, checks = doctor(capsys, project, uri)
    assert not checks["processed data"]["ok"] and "leakage" in checks["processed data"]["detail"]
    write_processed(local)
    local.write_json("results/baseline/logreg_metrics.json", {"model": "logreg", "test": {"macro_f1": 0.81}})
    for k, v in saved.items(): monkeypatch.setenv(k, v)                     # the credentials fix
    s3 = boto("s3"); s3.create_bucket(Bucket=bucket)                       # a bucket without public-access block
    rc, checks = doctor(capsys, project, uri)
    assert rc == 1
    for name in ("processed data", "local baseline results", "AWS credentials and region"): assert checks[name]["ok"], checks[name]
    assert not checks["bucket"]["ok"] and "public access not blocked" in checks["bucket"]["detail"]
    assert not checks["SageMaker role"]["ok"] and "role_arn is not set" in checks["SageMaker role"]["detail"]

    # the suggested bootstrap fixes the bucket and the role
    assert checks["bucket"]["fix"] == f"nlpmt aws bootstrap --bucket {bucket} --prefix proj --config-dir {project/'configs'}"
    apply_fix(capsys, checks["bucket"]["fix"])
    rc, checks = doctor(capsys, project, uri)
    assert checks["bucket"]["ok"] and checks["SageMaker role"]["ok"], checks
    assert not checks["sync"]["ok"] and "data/processed/data_report.json" in checks["sync"]["detail"]

    # the suggested sync fixes the pending uploads
    apply_fix(capsys, checks["sync"]["fix"])
    rc, checks = doctor(capsys, project, uri)
    assert rc == 0 and all(c["ok"] for c in checks.values()), checks

    # a role whose policy lost s3:PutObject is a ✗ until bootstrap repairs it
    iam = boto("iam")
    role = yaml.safe_load((project/"configs"/"project.yaml").read_text())["role_arn"].rpartition("/")[2]
    doc = sagemaker_role_policy(bucket, "proj")
    statements(doc)["ReadWriteProjectObjects"]["Action"].remove("s3:PutObject")
    iam.put_role_policy(RoleName=role, PolicyName=SAGEMAKER_POLICY_NAME, PolicyDocument=json.dumps(doc))
    rc, checks = doctor(capsys, project, uri)
    assert rc == 1 and "does not allow: s3:PutObject" in checks["SageMaker role"]["detail"]
    # a role whose logs cover only Training jobs (Processing jobs log to their own group) is a ✗ too
    doc = sagemaker_role_policy(bucket, "proj")
    statements(doc)["WriteJobLogs"]["Resource"] = [r for r in statements(doc)["WriteJobLogs"]["Resource"] if "TrainingJobs" in r]
    iam.put_role_policy(RoleName=role, PolicyName=SAGEMAKER_POLICY_NAME, PolicyDocument=json.dumps(doc))
    rc, checks = doctor(capsys, project, uri)
    detail = checks["SageMaker role"]["detail"]
    assert rc == 1 and "logs:PutLogEvents on arn:aws:logs:us-east-1:123456789012:log-group:/aws/sagemaker/ProcessingJobs" in detail
    assert "TrainingJobs" not in detail
    apply_fix(capsys, checks["SageMaker role"]["fix"])
    rc, out, _ = run(capsys, "doctor", "--store", uri, "--config-dir", project/"configs")
    assert rc == 0 and out.count("✓") == 7 and "✗" not in out and "7/7 checks passed" in out


# ---------------------------------------------------------------- the EC2 user-data script, for real

def api(port, token, path, method="GET", body=None):
    "Call the JupyterLab REST API; returns (status, parsed JSON or None)."
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, json.loads(data) if data else None
    except urllib.error.HTTPError as e: return e.code, None


def execute_in_kernel(port, token, kernel_id, code, timeout=90.0) -> str:
    "Run `code` in a kernel over the Jupyter websocket protocol; returns its stdout."
    import websocket
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels",
                                     header=[f"Authorization: token {token}"], timeout=timeout)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                                   "msg_type": "execute_request", "version": "5.3",
                                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                                    "allow_stdin": False, "stop_on_error": True}}))
    out, reply, idle, deadline = [], None, False, time.time() + timeout
    try:
        while not (reply and idle) and time.time() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id: continue
            kind = msg["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout": out.append(msg["content"]["text"])
            elif kind == "error": raise AssertionError("\n".join(msg["content"]["traceback"]))
            elif kind == "execute_reply": reply = msg["content"]["status"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle": idle = True
    finally: ws.close()
    assert reply == "ok", f"no successful execute_reply (got {reply!r})"
    return "".join(out)


def test_user_data_script_installs_syncs_and_serves_jupyterlab(aws_env, s3_bucket, tmp_path):
    # the store on the moto server: the laptop's configs (with a recognisable name) and processed data
    store = S3Store(f"s3://{s3_bucket}/proj")
    for f in (ROOT/"configs").glob("*.yaml"): store.write_bytes(f"configs/{f.name}", f.read_bytes())
    store.write_text("configs/project.yaml", (ROOT/"configs"/"project.yaml").read_text().replace("name: nlp-multitype", "name: from-the-store"))
    write_processed(store)
    store.write_text("data/raw/big.csv", "not synced to the instance\n")

    work, home, port = tmp_path/"work", tmp_path/"home", free_port()
    home.mkdir()
    script = tmp_path/"user-data.sh"   # rendered the way `nlpmt aws ec2 launch` renders it
    script.write_text(render_user_data({"NLPMT_STORE": store.uri, "NLPMT_SRC": ROOT, "WORKDIR": work, "PORT": port,
                                            "PYTHON": sys.executable, "NLPMT_PIP_OPTS": "--no-deps --no-build-isolation",
                                            "NLPMT_AS_USER": "1", "NLPMT_WAIT": 120}))
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home/"jc"), "JUPYTER_DATA_DIR": str(home/"jd"),
           "JUPYTER_RUNTIME_DIR": str(home/"jr"), "IPYTHONDIR": str(home/"ip"), "PIP_NO_INDEX": "1"}
    env.pop("NLPMT_STORE", None); env.pop("NLPMT_ROOT", None)
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    pid_file, token = work/"jupyter.pid", ""
    try:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "JupyterLab is up on 127.0.0.1" in done.stdout
        # synced: configs into the project (the store's version wins), data/processed into the local store only
        assert yaml.safe_load((work/"project"/"configs"/"project.yaml").read_text())["name"] == "from-the-store"
        assert (work/"store"/"data"/"processed"/"data_report.json").is_file() and not (work/"store"/"data"/"raw").exists()
        token_file = work/".jupyter_token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in script.read_text() and token not in done.stdout

        status, listing = api(port, token, "/api/contents/nbs")
        assert status == 200 and "07_aws.ipynb" in [c["name"] for c in listing["content"]]
        assert api(port, None, "/api/contents/nbs")[0] == 403 and api(port, "wrong", "/api/contents/nbs")[0] == 403

        status, kernel = api(port, token, "/api/kernels", "POST", {"name": "python3"})
        assert status == 201
        out = execute_in_kernel(port, token, kernel["id"], "import nlpmt, os\nfrom nlpmt.storage import open_store\n"
                                "print(nlpmt.__file__)\nprint(open_store().list('data/processed'))\n"
                                "print(os.environ['NLPMT_REMOTE_STORE'])\nprint(21 * 2)")
        lines = out.strip().splitlines()
        assert lines[0] == str(work/"project"/"nlpmt"/"__init__.py")     # nlpmt installed from the copied checkout
        assert "data/processed/data_report.json" in lines[1] and "data/processed/train_2class.csv" in lines[1]
        assert lines[2:] == [store.uri, "42"]
        assert api(port, token, f"/api/kernels/{kernel['id']}", "DELETE")[0] == 204

        # a rerun is safe: nothing re-copied over local edits, the running server is kept
        (work/"project"/"nbs"/"07_aws.ipynb").write_text("{}")
        again = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "already running" in again.stdout, again.stderr[-2000:]
        assert (work/"project"/"nbs"/"07_aws.ipynb").read_text() == "{}"
    finally:
        if pid_file.exists():
            pid = int(pid_file.read_text())
            api(port, token, "/api/shutdown", "POST")
            for _ in range(100):
                try: os.kill(pid, 0)
                except ProcessLookupError: break
                time.sleep(0.1)
            else: os.kill(pid, signal.SIGKILL)
    with pytest.raises(ProcessLookupError): os.kill(pid, 0)


def test_trust_policies_carry_confused_deputy_conditions_and_arns_are_pinned(capsys):
    "Issue 11 (IAM): aws:SourceAccount on the SageMaker trust policy (EC2 sends none), aws:SourceArn for SageMaker, region/account in every ARN."
    account = "210987654321"
    rc, out, _ = run(capsys, "aws", "policy", "sagemaker", "--bucket", "my-bucket", "--account", account,
                     "--region", "eu-west-1", "--config-dir", ROOT/"configs")
    doc = json.loads(out)
    assert rc == 0 and check_policy(doc["permissions"], "my-bucket") == []
    (trust,) = doc["trust"]["Statement"]
    assert trust["Condition"] == {"StringEquals": {"aws:SourceAccount": account},
                                  "ArnLike": {"aws:SourceArn": f"arn:aws:sagemaker:eu-west-1:{account}:*"}}
    assert all(r.startswith(f"arn:aws:logs:eu-west-1:{account}:log-group:/aws/sagemaker/")
               for r in statements(doc["permissions"])["WriteJobLogs"]["Resource"])
    # the generated role still allows every job need in its own account and region, and none in another account
    needs = sagemaker_job_needs("my-bucket", None, region="eu-west-1", account=account)
    assert all(policy_allows([doc["permissions"]], a, r) for a, r in needs)
    other = sagemaker_job_needs("my-bucket", None, region="eu-west-1", account="111111111111")
    assert not policy_allows([doc["permissions"]], *next((a, r) for a, r in other if r.startswith("arn:aws:logs")))
    # EC2: no condition (EC2 sends neither source account nor ARN for an instance profile); PassRole of this account's role only
    rc, out, _ = run(capsys, "aws", "policy", "ec2", "--bucket", "my-bucket", "--account", account, "--config-dir", ROOT/"configs")
    doc = json.loads(out)
    assert rc == 0 and check_policy(doc["permissions"], "my-bucket") == []
    assert "Condition" not in doc["trust"]["Statement"][0]
    name = yaml.safe_load((ROOT/"configs"/"project.yaml").read_text())["name"]
    assert statements(doc["permissions"])["PassOnlyTheSageMakerRole"]["Resource"] == \
        f"arn:aws:iam::{account}:role/{name}-sagemaker-execution"
    assert all(f":us-east-1:{account}:" in r for r in statements(doc["permissions"])["RunSageMakerJobs"]["Resource"])
    # unknown account: no condition is invented, ARNs keep '*'; a malformed account is an error naming it
    rc, out, _ = run(capsys, "aws", "policy", "sagemaker", "--bucket", "my-bucket", "--part", "trust", "--config-dir", ROOT/"configs")
    assert rc == 0 and "Condition" not in json.loads(out)["Statement"][0]
    rc, _, err = run(capsys, "aws", "policy", "sagemaker", "--bucket", "my-bucket", "--account", "12345", "--config-dir", ROOT/"configs")
    assert rc == 1 and "'12345' is not a 12-digit AWS account id" in err


@pytest.mark.parametrize("bucket,reason", [("ab", "is too short (2 characters; at least 3)"),
                                           ("x" * 64, "is too long (64 characters; at most 63)"),
                                           ("My_Bucket", "has characters S3 does not allow"),
                                           ("my..bucket", "has two adjacent periods"),
                                           ("192.168.1.1", "is formatted as an IP address"),
                                           ("xn--bucket", "starts with the reserved prefix 'xn--'")])
def test_invalid_bucket_names_get_the_reason_and_s3_naming_rule(capsys, bucket, reason):
    from nlpmt.storage import parse_s3_uri
    rc, _, err = run(capsys, "aws", "policy", "sagemaker", "--bucket", bucket, "--config-dir", ROOT/"configs")
    assert rc == 1 and reason in err and "S3 bucket names are 3-63 characters" in err
    with pytest.raises(ValueError, match="S3 bucket names are 3-63 characters") as e: parse_s3_uri(f"s3://{bucket}/proj")
    assert reason in str(e.value)                      # a store URI says the same, before any request is made

"""The `nlpmt` console script as a user runs it: a real subprocess, local and S3 stores."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NLPMT = str(Path(sys.executable).parent/"nlpmt")


def nlpmt(*args, env=None, cwd=ROOT):
    "Run the console script; returns the CompletedProcess."
    return subprocess.run([NLPMT, *args], capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})},
                          timeout=120)


def test_help_on_every_core_command():
    for args in [["--help"], ["ls", "--help"], ["sync", "--help"], ["config", "--help"], ["config", "show", "--help"]]:
        r = nlpmt(*args); assert r.returncode == 0 and "usage: nlpmt" in r.stdout, (args, r.stderr)
    top = nlpmt("--help").stdout
    for cmd in ["ls", "sync", "config", "run", "pipeline", "jobs", "predict", "report", "aws", "doctor"]: assert cmd in top


def test_config_show_effective_and_errors():
    r = nlpmt("config", "show", "--format", "json", "--set", "transformer.epochs=3", env={"NLPMT_PROJECT__REGION": "eu-west-1"})
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["transformer"]["epochs"] == 3.0 and cfg["project"]["region"] == "eu-west-1"
    bad = nlpmt("config", "show", "--set", "transformer.epoch=3")
    assert bad.returncode != 0 and "models_transformer.yaml" in bad.stderr and "unknown key 'epoch'" in bad.stderr


def test_sync_and_ls_against_s3(aws_env, s3_bucket, tmp_path):
    local = tmp_path/"store"
    (local/"results/baseline").mkdir(parents=True); (local/"results/baseline/logreg_metrics.json").write_text("{}")
    (local/"data/processed").mkdir(parents=True); (local/"data/processed/train_4class.csv").write_text("text,label\n")
    (local/"not_layout").mkdir(); (local/"not_layout/x.txt").write_text("ignored")
    uri = f"s3://{s3_bucket}/runs"
    dry = nlpmt("sync", "up", uri, "--local", str(local), "--dry-run", "-q")
    assert dry.returncode == 0 and "would copy results/baseline/logreg_metrics.json" in dry.stdout and "[dry run]" in dry.stdout
    assert nlpmt("ls", uri).stdout == ""
    up = nlpmt("sync", "up", uri, "--local", str(local), "-q")
    assert up.returncode == 0 and "copied 2" in up.stdout, up.stdout + up.stderr
    listed = nlpmt("ls", uri).stdout.split()
    assert "results/baseline/logreg_metrics.json" in listed and "data/processed/train_4class.csv" in listed
    assert not any(k.startswith("not_layout") for k in listed)
    assert "copied 0" in nlpmt("sync", "up", uri, "--local", str(local), "-q").stdout
    down = nlpmt("sync", "down", uri, "--local", str(tmp_path/"copy"), "-q")
    assert down.returncode == 0 and (tmp_path/"copy/results/baseline/logreg_metrics.json").read_text() == "{}"


def test_bad_store_uri_is_a_clear_error():
    r = nlpmt("ls", "gs://bucket/x")
    assert r.returncode == 1 and "unsupported store URI" in r.stderr


def test_help_on_aws_cost_and_doctor_commands():
    "The aws, cost and doctor commands answer --help; an option they share reads the same in each of them."
    helps = {}
    for args in [["aws"], ["aws", "ec2", "launch"], ["aws", "bootstrap"], ["cost", "estimate"], ["doctor"]]:
        r = nlpmt(*args, "--help")
        assert r.returncode == 0 and "usage: nlpmt" in r.stdout, (args, r.stderr)
        helps[" ".join(args)] = " ".join(r.stdout.split())
    for sub in ("policy", "check-policy", "bootstrap", "ec2", "budget"): assert sub in helps["aws"]
    store = "--store STORE the cloud store, s3://bucket/prefix (default: project.store if s3://, else s3://project.bucket)"
    assert store in helps["aws ec2 launch"] and store in helps["doctor"]
    spot = "--spot spot capacity (cheaper, can be interrupted)"
    assert spot in helps["aws ec2 launch"] and spot in helps["cost estimate"]
    assert "--bucket BUCKET the project's S3 bucket" in helps["aws bootstrap"]

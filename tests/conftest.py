"""Shared pytest fixtures: a real moto S3/SageMaker/IAM server on 127.0.0.1, and small stores."""
import os, socket, subprocess, sys, time, shutil, urllib.request
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = (ROOT.parent/"shared"/"data"/"ag_news").resolve()


def free_port() -> int:
    "An unused TCP port on 127.0.0.1."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30.0) -> None:
    "Wait until an HTTP server answers at `url`."
    deadline = time.time() + timeout
    while time.time() < deadline:
        try: urllib.request.urlopen(url, timeout=1); return
        except Exception: time.sleep(0.1)
    raise RuntimeError(f"server at {url} did not start")


@pytest.fixture(scope="session")
def moto_server():
    "A moto server on a free 127.0.0.1 port for the whole session; yields its endpoint URL."
    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent/"moto_server")
    log = open(Path(os.environ.get("TMPDIR", "/tmp"))/f"moto-{port}.log", "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/moto-api/")
        yield url
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()


@pytest.fixture
def aws_env(moto_server, monkeypatch):
    "Point boto3 and the SageMaker SDK at the moto server with fake credentials; yields the endpoint URL."
    for k, v in {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                 "SAGEMAKER_VALIDATE_ROLE": "false"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"): monkeypatch.delenv(k, raising=False)
    yield moto_server


@pytest.fixture
def s3_bucket(aws_env):
    "A fresh, empty bucket on the moto server; yields its name."
    import boto3, uuid
    name = f"nlpmt-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket=name)
    yield name


@pytest.fixture
def ag_news_dir():
    "The shared AG News test split (skips the test if it is missing)."
    if not (AG_NEWS/"test.csv").exists(): pytest.skip(f"AG News not found at {AG_NEWS}")
    return AG_NEWS

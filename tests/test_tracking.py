"""MLflow tracking against a real `mlflow server` (SQLite backend) on 127.0.0.1: after a tiny sweep of real jobs the
runs, tags, params, metric histories and artifacts are there as `MlflowClient` reads them, and the MLflow UI lists
the runs in headless Chromium (screenshot kept under the test's tmp folder, artifacts/)."""
import json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import free_port, _wait_http
from nlpmt.sweep import run_sweep, parse_param

ROOT = Path(__file__).resolve().parents[1]
QUAD = str(ROOT/"tests"/"notebooks"/"quad.ipynb")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    "`mlflow server` with a SQLite backend and local artifacts on a free port; killed at the end."
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = shutil.which("mlflow") or str(Path(sys.executable).parent/"mlflow")
    log = open(root/"server.log", "w")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root/'mlflow.db'}",
                             "--artifacts-destination", str(root/"artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", timeout=120)
        yield url
    finally:
        try: os.killpg(proc.pid, 15)
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, 9); proc.wait()
        log.close()


@pytest.fixture(scope="module")
def tracked_sweep(mlflow_server, tmp_path_factory):
    "A two-trial sweep of real jobs with tracking on (experiment named after this test module's run)."
    store = tmp_path_factory.mktemp("store")
    experiment = f"nlpmt-test-{os.getpid()}"
    old = {k: os.environ.get(k) for k in ("NLPMT_PROJECT__TRACKING_URI", "NLPMT_MLFLOW_EXPERIMENT")}
    os.environ.update({"NLPMT_PROJECT__TRACKING_URI": mlflow_server, "NLPMT_MLFLOW_EXPERIMENT": experiment})
    try:
        res = run_sweep(QUAD, [parse_param("x", "0.1,0.3")], store=str(store), sweep_id="tracked", progress=False)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return res.manifest, experiment


def test_every_trial_is_an_mlflow_run_with_tags_params_histories_and_artifacts(mlflow_server, tracked_sweep):
    from mlflow.tracking import MlflowClient
    manifest, experiment = tracked_sweep
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    by_trial = {r.data.tags["nlpmt.trial"]: r for r in runs}
    for t in manifest["trials"]:
        run = by_trial[t["trial"]]
        assert run.info.run_name == t["job_names"][0] and run.info.status == "FINISHED"
        tags = run.data.tags
        assert (tags["nlpmt.stage"], tags["nlpmt.run_id"], tags["nlpmt.sweep_id"]) == ("quad", t["run_id"], "tracked")
        assert tags["mlflow.source.git.commit"] and tags["nlpmt.job_name"] == t["job_names"][0]
        assert float(run.data.params["x"]) == t["params"]["x"] and "store" in run.data.params
        history = client.get_metric_history(run.info.run_id, "val_macro_f1")
        assert [m.step for m in history] == [1, 2]                 # per epoch, from runner.log_metrics
        assert history[-1].value == pytest.approx(t["objective"], abs=1e-4)
        assert run.data.metrics["test_macro_f1"] == pytest.approx(t["objective"] - 0.01, abs=1e-6)   # final metrics
        arts = {a.path for d in ("metrics", "figures", "notebook") for a in client.list_artifacts(run.info.run_id, d)}
        assert "metrics/quad_metrics.json" in arts and "notebook/quad.ipynb" in arts
        assert any(a.startswith("figures/") and a.endswith(".png") for a in arts)
        local = client.download_artifacts(run.info.run_id, "metrics/quad_metrics.json")
        assert json.loads(Path(local).read_text())["validation"]["macro_f1"] == pytest.approx(t["objective"])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it in .ci/run)")
def test_mlflow_ui_lists_the_runs_in_headless_chromium(mlflow_server, tracked_sweep, tmp_path):
    from mlflow.tracking import MlflowClient
    manifest, experiment = tracked_sweep
    exp = MlflowClient(tracking_uri=mlflow_server).get_experiment_by_name(experiment)
    url = f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs"   # the runs tab (MLflow 3 may open on traces)
    artifacts = tmp_path/"artifacts"; artifacts.mkdir()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path/'profile'}", "--virtual-time-budget=20000", "--window-size=1400,900"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    names = [t["job_names"][0] for t in manifest["trials"]]
    assert all(n in dom for n in names), dom[-2000:]
    shot = artifacts/"mlflow_experiment.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_a_sagemaker_mlflow_arn_is_handled_by_the_sagemaker_mlflow_plugin_and_off_means_off(monkeypatch, tmp_path):
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from nlpmt.tracking import configured_tracking_uri, resolve_tracking_uri, start_job_run
    arn = "arn:aws:sagemaker:us-east-1:123456789012:mlflow-tracking-server/research"
    assert resolve_tracking_uri(arn) == arn
    assert _tracking_store_registry._registry["arn"].__module__.startswith("sagemaker_mlflow")
    monkeypatch.delenv("NLPMT_PROJECT__TRACKING_URI", raising=False)
    assert configured_tracking_uri() is None                                  # the shipped default: off
    assert start_job_run("quad", "quad", "r1", {}, str(tmp_path), None) is None
    monkeypatch.setenv("NLPMT_PROJECT__TRACKING_URI", arn)
    assert configured_tracking_uri() == arn


# ---------------------------------------------------------------- a local folder as project.tracking_uri

NLPMT = str(Path(sys.executable).parent/"nlpmt")


def run_tracked_job(tmp_path: Path, tracking_uri: str, **env) -> subprocess.CompletedProcess:
    """`nlpmt run` of the quad notebook with `project.tracking_uri` set, in a clean environment (no MLflow opt-in);
    its output (stdout and stderr together) in `.stdout`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "NLPMT_MLFLOW_"))}
    clean.update({"NLPMT_PROJECT__TRACKING_URI": tracking_uri, "NLPMT_MLFLOW_EXPERIMENT": "local-folder", **env})
    return subprocess.run([NLPMT, "run", QUAD, "--store", str(tmp_path/"store")], env=clean, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_a_local_folder_tracks_a_real_job_into_sqlite_there_that_mlflow_reads_back(tmp_path, monkeypatch):
    "MLflow 3 refuses a new folder store without MLFLOW_ALLOW_FILE_STORE: a folder becomes `{folder}/mlflow.db`."
    from mlflow.tracking import MlflowClient
    from nlpmt.tracking import resolve_tracking_uri
    folder = tmp_path/"mlruns"
    res = run_tracked_job(tmp_path, str(folder))
    assert res.returncode == 0 and "stage quad completed" in res.stdout and "MLflow tracking" not in res.stdout, res.stdout[-3000:]
    assert (folder/"mlflow.db").is_file() and (folder/"mlartifacts").is_dir()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = resolve_tracking_uri(str(folder))
    assert uri == f"sqlite:///{folder.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("local-folder").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["nlpmt.stage"] == "quad"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1, 2]   # from the kernel
    assert run.data.metrics["test_macro_f1"] == pytest.approx(0.95)
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "notebook")}
    assert arts == {"notebook/quad.ipynb"} and run.info.artifact_uri.startswith((folder/"mlartifacts").resolve().as_uri())


def test_a_folder_that_already_holds_a_file_store_keeps_it_and_a_store_that_fails_warns_loudly(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    folder = tmp_path/"old-mlruns"
    subprocess.run([sys.executable, "-c", f"from mlflow.tracking import MlflowClient; "
                    f"MlflowClient({folder.as_uri()!r}).create_experiment('before')"],
                   env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}, check=True, timeout=120)
    res = run_tracked_job(tmp_path, str(folder))
    assert res.returncode == 0 and "stage quad completed" in res.stdout and "MLflow tracking" not in res.stdout, res.stdout[-3000:]
    assert not (folder/"mlflow.db").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")                  # reading a file store needs it in MLflow 3
    client = MlflowClient(tracking_uri=folder.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("local-folder").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1, 2]
    assert client.get_experiment_by_name("before") is not None              # the runs already there are still there

    not_a_folder = tmp_path/"file"; not_a_folder.write_text("")
    res = run_tracked_job(tmp_path, str(not_a_folder))
    assert res.returncode == 0 and "stage quad completed" in res.stdout, res.stdout[-3000:]   # tracking never fails a job
    assert (f"WARNING: MLflow tracking is OFF for this job: no run could be started at tracking URI {not_a_folder} "
            f"(= sqlite:///{not_a_folder.resolve()}/mlflow.db): ") in res.stdout, res.stdout[-3000:]

"""One model across processes: the transformer stage under torchrun (DDP, 2 CPU processes, gloo) against one
process at the same global batch; only process 0 writes. Tiny random BERT, synthetic separable texts."""
import json
from pathlib import Path
import pytest
from nlpmt.core import load_config
from nlpmt.metrics import validate_metrics_record
from nlpmt.storage import LocalStore
from nlpmt.train import run_training
from nlpmt.transformer import CHECKPOINT_MARKER, checkpoint_folders, make_tiny_bert, separable_texts, train_params
from test_transformer import seed_store

ROOT = Path(__file__).resolve().parents[1]
# global batch 16: one process takes 16 per step, each of two processes 8 of the same 16
SAME_GLOBAL_BATCH = dict(epochs=3, learning_rate=1e-2, batch_size=16, max_length=32, save_steps=10, precision="fp32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The same training job on one process and on two (torchrun, gloo), each into its own store."
    config = load_config(ROOT/"configs")
    model = make_tiny_bert(tmp_path_factory.mktemp("models")/"tiny-bert", separable_texts(600)["text"])
    out = {}
    for nproc in (1, 2):
        store = LocalStore(tmp_path_factory.mktemp(f"store{nproc}"))
        seed_store(store)
        params = train_params(config, model_name=str(model), **SAME_GLOBAL_BATCH)
        out[nproc] = (store, run_training(store, params, config, nproc=nproc, num_threads=1, progress=False))
    return out


def test_two_processes_learn_like_one_at_the_same_global_batch(runs):
    (_, one), (_, two) = runs[1], runs[2]
    r1, r2 = one.record, two.record
    assert r2["world_size"] == 2 and r1["world_size"] == 1 and "x 2 processes (DDP)" in r2["device"]
    assert r2["steps"] == r1["steps"] == 3 * 14                 # same optimizer steps: 210 rows / 16 per step
    assert r1["history"][-1]["val_macro_f1"] > 0.8              # it learned (chance is about 0.33)
    assert abs(r2["history"][-1]["val_macro_f1"] - r1["history"][-1]["val_macro_f1"]) <= 0.01
    assert abs(r2["validation"]["macro_f1"] - r1["validation"]["macro_f1"]) <= 0.01
    assert r2["train_examples"] >= 3 * r2["train_rows"] and r2["train_examples_per_second"] > 0


def test_only_process_zero_writes(runs):
    store, run = runs[2]
    rec = run.record
    assert validate_metrics_record(rec) == []
    metrics = [k for k in store.list("results") if k.endswith(".json") and "transformer" in k]
    assert len(metrics) == 1, metrics                            # one metrics file, not one per process
    assert json.loads(store.read_bytes(metrics[0]))["world_size"] == 2
    for key in ("model", "confusion", "training_curves", "summary"): assert store.exists(run.keys[key]) or store.list(run.keys[key])
    assert len(run.summary) == 1
    folders = checkpoint_folders(Path(run.checkpoint_folder))
    assert folders and all((f/CHECKPOINT_MARKER).is_file() for f in folders)
    steps = [int(f.name.split("-")[1]) for f in folders]
    assert len(steps) == len(set(steps))                         # one folder per saved step
    for f in folders:                                            # each process left its RNG state in the one folder
        assert {p.name for p in f.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


# ---------------------------------------------------------------- SageMaker: several instances

ROLE = "arn:aws:iam::123456789012:role/nlpmt-sagemaker"


@pytest.fixture
def store_uri(s3_bucket):
    "An S3 store on moto holding processed data (what the transformer's channels read)."
    from nlpmt.storage import S3Store
    uri = f"s3://{s3_bucket}/proj"
    store = S3Store(uri)
    seed_store(store, n=60)
    return uri


@pytest.mark.aws
def test_training_on_two_instances_is_one_torchrun_job(store_uri, aws_env):
    import boto3
    from nlpmt.job_plan import plan_jobs
    from nlpmt.sagemaker_jobs import submit_sagemaker
    from nlpmt.storage import S3Store
    session = boto3.session.Session(region_name="us-east-1")
    requests = []
    session.events.register("before-call.sagemaker.CreateTrainingJob",
                            lambda params, model, **kw: requests.append(json.loads(params["body"])))
    config = load_config(ROOT/"configs", overrides=["project.instance_count=2", "project.use_spot=false"])
    spec, = plan_jobs("transformer", {"max_train_rows": "40", "nproc": "4"}, store=store_uri, config=config)
    submit_sagemaker(spec, config, role=ROLE, boto_session=session)
    req, = requests
    assert req["ResourceConfig"]["InstanceCount"] == 2
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in req["InputDataConfig"]}
    drivers = S3Store(channels["sm_drivers"])
    # the SDK's Torchrun driver with our process count, starting the entry that makes rank 0 the runner
    assert json.loads(drivers.read_bytes("distributed.json"))["process_count_per_node"] == 4
    train_sh = drivers.read_bytes("sm_train.sh").decode()
    assert "distributed_drivers/torchrun_driver.py" in train_sh
    code = S3Store(channels["code"])
    assert {"nlpmt_torchrun.py", "nlpmt_job_args.json", "nlpmt/train.py", "requirements.txt"} <= set(code.list())
    args = json.loads(code.read_bytes("nlpmt_job_args.json"))
    assert args[:4] == ["--stage", "transformer", "--store", store_uri] and spec.run_id in args
    assert "nlpmt.runner" in code.read_bytes("nlpmt_torchrun.py").decode()


def test_several_instances_for_a_stage_that_does_not_train_is_refused_at_planning(tmp_path):
    from nlpmt.core import ConfigError
    from nlpmt.job_plan import plan_jobs
    config = load_config(ROOT/"configs", overrides=["project.instance_count=2"])
    with pytest.raises(ConfigError, match=r"instance_count is 2, but stage 'baseline' does not train"):
        plan_jobs("baseline", {}, store=str(tmp_path), config=config)
    assert plan_jobs("transformer", {}, store=str(tmp_path), config=config)[0].kind == "training"


def test_nproc_reaches_the_transformer_notebook_and_no_other(tmp_path, capsys):
    from nlpmt.cli import main
    from nlpmt.job_plan import plan_jobs
    rc = main(["run", "baseline", "--nproc", "2", "--store", str(tmp_path), "--config-dir", str(ROOT/"configs")])
    assert rc != 0 and "unknown parameter 'nproc'" in capsys.readouterr().err
    spec, = plan_jobs("transformer", {"nproc": "2"}, store=str(tmp_path), config=load_config(ROOT/"configs"))
    assert spec.params["nproc"] == 2

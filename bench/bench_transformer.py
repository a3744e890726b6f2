#!/usr/bin/env python
"""Benchmark: the transformer stage against the Hugging Face `Trainer` used as documented, same model, same rows, one run.

Every arm fine-tunes the same model on the same training rows of the same split (the data stage run on the
configured raw data, by default AG News with the data config's 70/10/20 split of 7,600 rows) and predicts the
same test split. The arms:

- **stage**: `nlpmt.transformer.train_transformer` as the job runs it (dynamic padding, length-grouped batches,
  autocast precision "auto", warmup + decay, per-epoch validation, checkpoints), with the config's settings
  for the model (for MiniLM: learning rate 1e-4, no dropout, embeddings and lowest layer fixed) and its
  default speed levers (on a CPU: fused AdamW, eager attention); `--nproc N` runs it as the job does with
  `-p nproc N` (DDP under torchrun); `--stage-settings` and `--stage-levers` switch them one by one, e.g.
  `--stage-settings dropout=0.1,freeze_layers=0 --stage-levers fused_adamw=false,attention=` is the stage
  before either was tuned;
- **stage-fp32**: the stage with autocast off;
- **plain**: the Trainer's documented recipe (the text-classification tutorial): fp32, dynamic padding with
  `DataCollatorWithPadding`, learning rate 5e-5, shuffled batches, no warmup, no validation or checkpoints;
- **tuned**: `plain` plus the Trainer's own speed options: mixed precision `bf16=True` (with `use_cpu=True` on
  a CPU; on a GPU bf16 where supported, else fp16) and `train_sampling_strategy="group_by_length"`. This is the
  strongest Trainer configuration we know of, and the one README claims are made against (see GROUPED_NOTE:
  group_by_length *does* learn; it only looked as if it did not);
- **tuned-bf16**: `plain` plus `bf16=True` only (what `tuned` was before group_by_length was found to work);
- **pad128**: `plain` with every text padded to `--max-length` (the benchmark's former peer: weaker than the
  documented recipe, kept to show what padding costs).

All Trainer arms use the stage's batch size (`--batch-size`, default: the config's), so arms differ in
recipe, not in batch size. Throughput is training examples per second *inside training steps* (validation and
checkpoint writing left out, measured the same way for every arm); wall-clock seconds of the whole `train()`
call are printed too; then test macro-F1 and accuracy. The summary prints the stage's ratio against each arm.

    python bench/bench_transformer.py --train-rows 1000 --arms stage,tuned     # the README's claim
    python bench/bench_transformer.py --train-rows 1000 --arms stage,plain,tuned,pad128
    python bench/bench_transformer.py --train-rows 1000 --arms stage --nproc 2 # DDP on 2 processes
    python bench/bench_transformer.py --train-rows 1000 --arms stage,tuned --concurrent   # on a busy machine
On a GPU machine it runs on `cuda:0` (set CUDA_VISIBLE_DEVICES to choose); `--model` takes any hub name or folder.
For GPU throughput (>= 50,000 rows, levers one by one, model FLOPs utilisation) see bench/bench_gpu.py.
"""
import argparse, json, math, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("stage", "stage-fp32", "plain", "tuned", "tuned-bf16", "pad128")
GROUPED_NOTE = (   # why issue 16 measured group_by_length at macro-F1 0.26 (chance), and why `tuned` includes it
    "group_by_length learns. With train_sampling_strategy='group_by_length' the Trainer (transformers 5) also gives "
    "*evaluation and prediction* a LengthGroupedSampler (Trainer._get_eval_sampler), seeded and shuffled, so "
    "predict() returns predictions in a different order from the dataset's. Scored against the dataset's labels in "
    "their own order they look like chance (0.26 on 4 classes); scored against the label_ids predict() returns with "
    "them, as every Trainer arm here is, the model is as good as the others. A user who predicts unlabelled texts "
    "with such a Trainer gets their predictions shuffled: predict with a Trainer without group_by_length.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all-minilm-l6-v2", help="model name or folder (default: the packaged MiniLM)")
    p.add_argument("--rows", type=int, default=0,
                   help="split a stratified sample of this many raw rows instead of all of them (0: all, the shared split)")
    p.add_argument("--train-rows", type=int, default=0, help="train every arm on this many training rows (0: all)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (pad128 pads every text to it)")
    p.add_argument("--batch-size", type=int, default=0, help="training batch size of every arm (0: the config's)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every usable core)")
    p.add_argument("--precision", default="auto", help="the stage's precision: auto | bf16 | fp16 | fp32")
    p.add_argument("--nproc", type=int, default=1, help="the stage's training processes (DDP under torchrun)")
    p.add_argument("--arms", default="stage,plain,tuned",
                   help=f"arms to run, in this order, comma-separated: {', '.join(ARMS)}")
    p.add_argument("--config-dir", default=None, help="config folder (default: the project's configs/)")
    p.add_argument("--concurrent", action="store_true",
                   help="run the arms at the same time, one process each (1 thread each unless --threads): on a "
                        "machine shared with other work, every arm then sees the same load, so the ratios hold")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--stage-levers", default="",
                   help="the stage's SpeedLevers, e.g. 'fused_adamw=false,attention=' (the stage before its CPU levers); "
                        "unset levers keep the device's default")
    p.add_argument("--stage-settings", default="",
                   help="training settings for the stage only, e.g. 'dropout=0.1,freeze_layers=0' (MiniLM's settings before "
                        "they were tuned); unset ones come from the config")
    args = p.parse_args(argv)
    args.levers = parse_pairs(args.stage_levers, "--stage-levers", p)
    args.settings = parse_pairs(args.stage_settings, "--stage-settings", p)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in args.arms if a not in ARMS]
    if bad: p.error(f"--arms: unknown arm {bad[0]!r} (known: {', '.join(ARMS)})")
    return args


def parse_pairs(text: str, flag: str, parser) -> dict:
    "`name=value,...` with YAML-typed values (`attention=` is the empty string)."
    import yaml
    out = {}
    for pair in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = pair.partition("=")
        if not eq: parser.error(f"{flag}: expected name=value, got {pair!r}")
        out[name.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def build_store(config, rows: int):
    "A temporary store holding the data stage's split of the configured raw data (or of a stratified sample)."
    from nlpmt.storage import temp_store
    from nlpmt.data import prepare_data, prepare_demo_data
    store = temp_store("nlpmt-bench-")
    if rows: prepare_demo_data(store, rows=rows, seed=config.data.seed, config=config)
    else: prepare_data(config, store, progress=False)
    return store


def run_stage(store, config, args, work: Path, precision: str = "", arm: str = "stage") -> dict:
    "Train with the stage (on `--nproc` processes); returns its numbers."
    from nlpmt.train import run_training
    from nlpmt.transformer import SpeedLevers, train_params
    params = train_params(config, model_name=args.model, epochs=args.epochs, max_length=args.max_length,
                          max_train_rows=args.train_rows, precision=precision or args.precision, max_steps=0,
                          batch_size=args.batch_size or None, **args.settings)
    t0 = time.perf_counter()
    run = run_training(store, params, config, nproc=args.nproc, checkpoint_dir=str(work/f"{arm}-checkpoints"),
                       num_threads=args.threads, levers=SpeedLevers(**args.levers))
    rec = run.record
    frozen = ("word embeddings" if params.freeze_embeddings else "") + \
             (f"embeddings + {params.freeze_layers} lowest layer(s)" if params.freeze_layers else "")
    print(f"{arm}: dropout {'model default' if params.dropout is None else params.dropout}, frozen: {frozen or 'nothing'}, "
          f"{rec['trainable_parameters']:,} trainable parameters, validation macro-F1 {rec['validation']['macro_f1']:.4f}; "
          f"levers {rec['levers']}", flush=True)
    return {"arm": arm, "examples_per_second": rec["train_examples_per_second"], "train_seconds": rec["fit_seconds"],
            "train_examples": rec["train_examples"], "test_macro_f1": rec["test"]["macro_f1"],
            "test_accuracy": rec["test"]["accuracy"], "precision": rec["precision"], "device": rec["device"],
            "batch_size": params.batch_size, "learning_rate": params.learning_rate,
            "val_macro_f1": rec["validation"]["macro_f1"], "dropout": params.dropout, "freeze_embeddings": params.freeze_embeddings,
            "freeze_layers": params.freeze_layers, "trainable_parameters": rec["trainable_parameters"],
            "levers": rec["levers"], "total_seconds": time.perf_counter() - t0}


TRAINER_ARMS = {  # arm: (mixed precision, pad every text to max_length, Trainer's group_by_length sampling)
    "plain": (False, False, False), "tuned": (True, False, True), "tuned-bf16": (True, False, False),
    "pad128": (False, True, False)}


def run_trainer(store, config, args, work: Path, arm: str) -> dict:
    "Train with the stock Trainer in the recipe `arm` names (see the module docstring); returns its numbers."
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)
    from nlpmt.storage import read_data_report
    from nlpmt.transformer import (EncodedTexts, ThroughputCallback, TrainingMeter, load_splits, quiet_transformers,
                                   resolve_model_path, set_torch_threads, subsample_train, training_device)
    mixed, pad_all, grouped = TRAINER_ARMS[arm]
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
    batch_size = args.batch_size or config.transformer.batch_size
    device = training_device()
    bf16 = mixed and (device == "cpu" or torch.cuda.is_bf16_supported())
    fp16 = mixed and not bf16

    def encode(df):
        ids = df["label"].map(label_id)
        if not pad_all: return EncodedTexts(tok, df["text"], ids, args.max_length)   # unpadded: the collator pads
        enc = tok(df["text"].tolist(), padding="max_length", truncation=True, max_length=args.max_length)
        return [{k: enc[k][i] for k in enc} | {"labels": int(l)} for i, l in enumerate(ids)]

    meter = TrainingMeter()
    targs = TrainingArguments(output_dir=str(work/arm), per_device_train_batch_size=batch_size,
                              per_device_eval_batch_size=128, learning_rate=5e-5, num_train_epochs=args.epochs,
                              bf16=bf16, fp16=fp16, use_cpu=device == "cpu",
                              train_sampling_strategy="group_by_length" if grouped else "random",
                              eval_strategy="no", save_strategy="no", report_to="none", seed=seed,
                              dataloader_num_workers=0, logging_steps=50, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=encode(train), processing_class=tok,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[ThroughputCallback(meter)])
    where = f"{threads} thread{'s' * (threads > 1)}" if device == "cpu" else torch.cuda.get_device_name(0)
    precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    print(f"{arm}: {len(train):,} training rows, Trainer, {precision}, "
          f"{'padded to ' + str(args.max_length) if pad_all else 'dynamic padding'}"
          f"{', group_by_length' if grouped else ''}, on {device} ({where})", flush=True)
    t0 = time.perf_counter()
    with quiet_transformers(): trainer.train()
    train_seconds = time.perf_counter() - t0
    examples = len(train) * args.epochs
    out = trainer.predict(encode(splits["test"]))
    pred = (out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions).argmax(-1)
    # score against the labels predict() returns with the predictions: under group_by_length the Trainer's *test*
    # sampler is length-grouped and shuffled too, so predictions do not come back in the dataset's order
    true = out.label_ids
    assert sorted(true.tolist()) == sorted(splits["test"]["label"].map(label_id).tolist())
    return {"arm": arm, "examples_per_second": examples / meter.seconds, "train_seconds": train_seconds,
            "train_examples": examples, "test_macro_f1": float(f1_score(true, pred, average="macro")),
            "test_accuracy": float(accuracy_score(true, pred)), "precision": precision,
            "device": f"{device} ({where})", "batch_size": batch_size, "learning_rate": 5e-5,
            "total_seconds": time.perf_counter() - t0}


def run_concurrently(args) -> dict:
    "Every arm in its own process, all started together; returns each arm's numbers (see `--concurrent`)."
    import subprocess
    common = ["--model", args.model, "--rows", str(args.rows), "--train-rows", str(args.train_rows),
              "--epochs", str(args.epochs), "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads or 1), "--precision", args.precision, "--nproc", str(args.nproc)]
    if args.config_dir: common += ["--config-dir", args.config_dir]
    if args.stage_levers: common += ["--stage-levers", args.stage_levers]
    if args.stage_settings: common += ["--stage-settings", args.stage_settings]
    results = {}
    with tempfile.TemporaryDirectory(prefix="nlpmt-bench-") as tmp:
        procs = {}
        for arm in args.arms:
            log = open(Path(tmp)/f"{arm}.log", "w")
            procs[arm] = (subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *common, "--arms", arm,
                                            "--json", str(Path(tmp)/f"{arm}.json")], stdout=log, stderr=subprocess.STDOUT), log)
        print(f"running {', '.join(args.arms)} at the same time, {args.threads or 1} thread(s) each ...", flush=True)
        for arm, (proc, log) in procs.items():
            rc = proc.wait(); log.close()
            text = (Path(tmp)/f"{arm}.log").read_text(errors="replace")
            if rc != 0: raise SystemExit(f"arm {arm} failed (exit code {rc}):\n{text[-3000:]}")
            results[arm] = json.loads((Path(tmp)/f"{arm}.json").read_text())["results"][arm]
            print(f"{arm}: done", flush=True)
    return results


def summarise(results: dict) -> dict:
    "Print the stage's ratio against every other arm (examples/s and train() wall time) and the macro-F1 gap."
    out = {}
    if "stage" not in results: return out
    s = results["stage"]
    print("\nthe stage against each arm (ratio > 1: the stage is faster):")
    for name, r in results.items():
        if name == "stage": continue
        ratio = s["examples_per_second"] / r["examples_per_second"]
        wall = r["train_seconds"] / s["train_seconds"]
        diff = 100 * (s["test_macro_f1"] - r["test_macro_f1"])
        out[name] = {"speedup_examples_per_second": ratio, "speedup_train_wall": wall, "macro_f1_difference_points": diff}
        line = (f"  stage / {name}: {ratio:.2f}x examples/s, {wall:.2f}x train() wall, test macro-F1 "
                f"{s['test_macro_f1']:.4f} vs {r['test_macro_f1']:.4f} ({diff:+.2f} points)")
        if name == "tuned":
            ok = ratio >= 1.5 and diff >= -0.5
            line += f"  [target: >= 1.5x at macro-F1 within 0.5 points or better: {'met' if ok else 'NOT met'}]"
        print(line)
    print("  (train() wall includes the stage's per-epoch validation and checkpoint writing, which the Trainer arms "
          "skip; examples/s counts time inside training steps only, the same way for every arm)")
    if "tuned" in results: print("\nnote: " + GROUPED_NOTE)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from nlpmt.core import load_config
    config = load_config(args.config_dir)
    store = build_store(config, args.rows)
    report = store.read_json("data/processed/data_report.json")
    sizes = {s: report["splits"][s]["rows"] for s in ("train", "val", "test")}
    print(f"data: {sizes} rows (data hash {report['data_hash'][:12]}), model {args.model}, {args.epochs:g} epoch(s), "
          f"training rows used: {args.train_rows or sizes['train']}", flush=True)
    results = run_concurrently(args) if args.concurrent and len(args.arms) > 1 else {}
    with tempfile.TemporaryDirectory(prefix="nlpmt-bench-") as tmp:
        for arm in ([] if results else args.arms):
            if arm == "stage": results[arm] = run_stage(store, config, args, Path(tmp))
            elif arm == "stage-fp32": results[arm] = run_stage(store, config, args, Path(tmp), "fp32", arm)
            else: results[arm] = run_trainer(store, config, args, Path(tmp), arm)
    print("\n| arm | device | precision | batch | lr | train examples/s | train() wall s | test macro-F1 | test accuracy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['arm']} | {r['device']} | {r['precision']} | {r['batch_size']} | {r['learning_rate']:g} | "
              f"{r['examples_per_second']:.1f} | {r['train_seconds']:.1f} | {r['test_macro_f1']:.4f} | "
              f"{r['test_accuracy']:.4f} |")
    out = {"model": args.model, "data_hash": report["data_hash"], "sizes": sizes, "args": vars(args),
           "results": results, "against": summarise(results)}
    if args.json: Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

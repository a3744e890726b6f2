#!/usr/bin/env python
"""GPU benchmark: the transformer stage against the tuned Trainer recipe on one GPU, lever by lever, small and base models.

Measures, in one run, for MiniLM (all-minilm-l6-v2, 22.7M parameters) and a bert-base-sized encoder (110M):

- **tuned**: the stock `Trainer` as documented (dynamic padding, learning rate 5e-5) plus its own speed options:
  mixed precision (bf16 where supported, else fp16) and `group_by_length` (the `tuned` arm of
  bench/bench_transformer.py, the README's peer);
- **stage**: `train_transformer` with the stage's defaults on CUDA (fused AdamW, no per-step host syncs,
  lengths padded to a multiple of 8) and the config's settings for the model (for MiniLM: no dropout,
  embeddings and lowest layer fixed), then with each lever of `SpeedLevers` switched on or off *alone*:
  `no-levers` (fused AdamW off, per-step NaN/inf check on: the stage as it was), `all-layers` (dropout 0.1
  and every layer trained: the model's own recipe), `compile` (torch.compile
  reduce-overhead = CUDA graphs, lengths bucketed to multiples of 32 so only 4 shapes compile), `workers`
  (2 collation workers, pinned memory), `eager-attn` / `sdpa` (attention kernel), `eval512` (evaluation
  batch 512), `bf16` (autocast forced on: the stage picks fp32 for models under 50M parameters on a GPU).

Training data: the shared AG News split's training rows repeated to `--rows` (default 50,000) with a seeded
shuffle (fine for throughput; validation and test are the split's own). Printed per arm: training examples/s
inside steps, wall seconds of training, validation and test macro-F1, the ratio against `tuned`; for the base
model also model FLOPs utilisation (MFU: 6 x parameters x tokens + attention, per second, over the GPU's
dense bf16 peak; `--peak-tflops` to override the table).

    python bench/bench_gpu.py                                 # on a CUDA machine: the full table (~15-25 min on an H100/H200)
    python bench/bench_gpu.py --models all-minilm-l6-v2 --arms tuned,stage,compile
    python bench/bench_gpu.py --smoke                         # any machine: tiny model, tiny data, end to end
The base model is `--base-model` (default bert-base-uncased, from the local Hugging Face cache); offline without
it, a randomly initialised bert-base-sized BERT with MiniLM's vocabulary stands in (throughput and MFU are the
same for that shape; its macro-F1 is not a fine-tuning result and is marked so).
"""
import argparse, json, math, sys, tempfile, time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVER_ARMS = {   # arm: (SpeedLevers overrides, TrainParams overrides)
    "stage": ({}, {}),
    "no-levers": ({"fused_adamw": False, "step_syncs": True, "attention": ""}, {}),
    "all-layers": ({}, {"dropout": 0.1, "freeze_embeddings": False, "freeze_layers": 0}),
    "compile": ({"compile_mode": "reduce-overhead", "bucket": 32}, {}),
    "workers": ({"loader_workers": 2}, {}),
    "eager-attn": ({"attention": "eager"}, {}),
    "sdpa": ({"attention": "sdpa"}, {}),
    "eval512": ({}, {"eval_batch_size": 512}),
    "bf16": ({}, {"precision": "bf16"}),
}
CUDA_ONLY = {"compile"}        # torch.compile warm-up alone takes about a minute on a CPU: skipped there
PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10G": 70, "A10": 125,
                    "V100": 125, "T4": 65}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="all-minilm-l6-v2,base", help="comma-separated; 'base' = --base-model")
    p.add_argument("--base-model", default="bert-base-uncased", help="the bert-base-sized model (hub name or folder)")
    p.add_argument("--arms", default="tuned,stage,no-levers,all-layers,compile,workers,eager-attn,eval512,bf16",
                   help=f"tuned and any of: {', '.join(LEVER_ARMS)}")
    p.add_argument("--base-arms", default="tuned,stage,no-levers,compile",
                   help="arms for the base model (each takes minutes there)")
    p.add_argument("--rows", type=int, default=50_000, help="training rows (the split's, repeated with a seeded shuffle)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak (0: from the table)")
    p.add_argument("--smoke", action="store_true", help="tiny random BERT on synthetic texts: checks the script end to end")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def repeated_train_store(store, rows: int, seed: int):
    "Replace the store's training split by its rows repeated to `rows` (seeded shuffle); data report updated to match."
    import pandas as pd
    from nlpmt.core import sha256_bytes
    from nlpmt.storage import SPLITS, read_data_report, read_split
    report = read_data_report(store)
    train = read_split(store, "train", report)
    reps = math.ceil(rows / len(train))
    big = pd.concat([train] * reps, ignore_index=True).sample(n=rows, random_state=seed, replace=rows > len(train) * reps)
    data = big.to_csv(index=False, lineterminator="\n").encode()
    key = report["splits"]["train"]["key"]
    store.write_bytes(key, data)
    report["splits"]["train"].update(rows=len(big), sha256=sha256_bytes(data),
                                     class_counts=big["label"].value_counts().to_dict())
    report["data_hash"] = sha256_bytes("\n".join(f"{s}:{report['splits'][s]['sha256']}" for s in SPLITS).encode())
    store.write_json("data/processed/data_report.json", report)
    return store


def smoke_store(work: Path):
    "A tiny store of separable synthetic texts and a tiny random BERT (for --smoke)."
    from nlpmt.core import sha256_bytes
    from nlpmt.storage import LocalStore, SPLITS
    from nlpmt.transformer import make_tiny_bert, separable_texts
    store = LocalStore(work/"store")
    df = separable_texts(300)
    parts = {"train": df.iloc[:210], "val": df.iloc[210:255], "test": df.iloc[255:]}
    labels, splits = sorted(df["label"].unique()), {}
    for name, part in parts.items():
        data = part.to_csv(index=False, lineterminator="\n").encode()
        key = f"data/processed/{name}_{len(labels)}class.csv"
        store.write_bytes(key, data)
        splits[name] = {"key": key, "rows": len(part), "sha256": sha256_bytes(data),
                        "class_counts": part["label"].value_counts().to_dict()}
    store.write_json("data/processed/data_report.json", {
        "labels": labels, "n_classes": len(labels), "splits": splits,
        "data_hash": sha256_bytes("\n".join(f"{s}:{splits[s]['sha256']}" for s in SPLITS).encode())})
    return store, str(make_tiny_bert(work/"tiny-bert", df["text"]))


def random_base_model(work: Path) -> str:
    "A randomly initialised bert-base-sized BERT (12 x 768) with MiniLM's tokenizer (the bert-base-uncased vocabulary)."
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from nlpmt.transformer import resolve_model_path
    folder = work/"bert-base-random"
    AutoTokenizer.from_pretrained(resolve_model_path("all-minilm-l6-v2")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522)).save_pretrained(folder)
    return str(folder)


def resolve_base(name: str, work: Path) -> tuple[str, bool]:
    "(model to load, is it pretrained): the named model if it loads offline, else a random stand-in."
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(name)
        return name, True
    except (OSError, ValueError):
        print(f"note: {name!r} is not available offline; a random-init bert-base-sized BERT stands in "
              "(throughput and MFU valid, macro-F1 not a fine-tuning result)", flush=True)
        return random_base_model(work), False


def mean_tokens(store, model: str, max_length: int) -> float:
    "Mean tokens per training text (after truncation), for the FLOPs count."
    from transformers import AutoTokenizer
    from nlpmt.storage import read_split
    from nlpmt.transformer import resolve_model_path
    texts = read_split(store, "train")["text"].head(5000).tolist()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
    return sum(len(i) for i in tok(texts, truncation=True, max_length=max_length)["input_ids"]) / len(texts)


def training_flops_per_example(n_params: int, layers: int, hidden: int, tokens: float) -> float:
    "Forward+backward FLOPs of one example: 6 x parameters x tokens plus attention scores (12 x layers x hidden x tokens^2)."
    return 6 * n_params * tokens + 12 * layers * hidden * tokens ** 2


def run_tuned(store, config, model: str, args, work: Path) -> dict:
    "The tuned Trainer arm (bench_transformer's `tuned`)."
    from bench_transformer import run_trainer
    a = argparse.Namespace(model=model, train_rows=0, epochs=args.epochs, max_length=args.max_length,
                           batch_size=args.batch_size, threads=0)
    r = run_trainer(store, config, a, work, "tuned")
    r["val_macro_f1"] = None      # the Trainer arm trains without validation (as documented)
    return r


def run_lever_arm(store, config, model: str, arm: str, args, work: Path) -> dict:
    "The stage with one lever switched (see LEVER_ARMS)."
    from nlpmt.transformer import SpeedLevers, train_params, train_transformer
    lever_kw, param_kw = LEVER_ARMS[arm]
    params = train_params(config, model_name=model, epochs=args.epochs, max_length=args.max_length,
                          batch_size=args.batch_size, max_train_rows=0, max_steps=0, **param_kw)
    print(f"{arm}: levers {lever_kw or 'defaults'} {param_kw or ''}", flush=True)
    t0 = time.perf_counter()
    run = train_transformer(store, params, config, checkpoint_dir=str(work/f"{arm}-checkpoints"),
                            levers=SpeedLevers(**lever_kw), progress=False)
    rec = run.record
    return {"arm": arm, "examples_per_second": rec["train_examples_per_second"], "train_seconds": rec["fit_seconds"],
            "val_macro_f1": rec["validation"]["macro_f1"], "test_macro_f1": rec["test"]["macro_f1"],
            "test_accuracy": rec["test"]["accuracy"], "precision": rec["precision"], "device": rec["device"],
            "levers": rec["levers"], "total_seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from nlpmt.core import load_config
    from nlpmt.storage import read_data_report
    cuda = torch.cuda.is_available()
    config = load_config()
    sys.path.insert(0, str(ROOT/"bench"))
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "args": vars(args), "models": {}}
    with tempfile.TemporaryDirectory(prefix="nlpmt-gpu-bench-") as tmp:
        work = Path(tmp)
        if args.smoke:
            store, tiny = smoke_store(work)
            models = [(tiny, "base", True)]       # (model, size, pretrained): "base" runs the MFU code path too
            args.rows, args.base_arms = 300, "tuned,stage,no-levers,all-layers,compile,workers,eval512"
            repeated_train_store(store, args.rows, seed=config.data.seed)
        else:
            from bench_transformer import build_store
            store = repeated_train_store(build_store(config, 0), args.rows, seed=config.data.seed)
            models = []                    # (model, size, pretrained)
            for m in (m.strip() for m in args.models.split(",") if m.strip()):
                if m == "base":
                    name, pretrained = resolve_base(args.base_model, work)
                    models.append((name, "base", pretrained))
                else: models.append((m, "small", True))
        report = read_data_report(store)
        print(f"device: {out['device']}; training rows {report['splits']['train']['rows']:,}, "
              f"val {report['splits']['val']['rows']:,}, test {report['splits']['test']['rows']:,}", flush=True)
        for model, size, pretrained in models:
            arms = (args.base_arms if size == "base" else args.arms).split(",")
            results = {}
            for arm in [a.strip() for a in arms if a.strip()]:
                if arm != "tuned" and arm not in LEVER_ARMS: raise SystemExit(f"unknown arm {arm!r}")
                if arm in CUDA_ONLY and not cuda:
                    print(f"{arm}: skipped (needs CUDA)", flush=True); continue
                results[arm] = (run_tuned(store, config, model, args, work) if arm == "tuned"
                                else run_lever_arm(store, config, model, arm, args, work))
            mfu = {}
            if size == "base":
                from transformers import AutoConfig, AutoModelForSequenceClassification
                from nlpmt.transformer import quiet_transformers
                mc = AutoConfig.from_pretrained(model)
                with quiet_transformers():
                    n_params = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(
                        model, num_labels=4).parameters())
                per_example = training_flops_per_example(n_params, mc.num_hidden_layers, mc.hidden_size,
                                                         mean_tokens(store, model, args.max_length))
                peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in out["device"]), 0)
                for arm, r in results.items():
                    r["tflops"] = per_example * r["examples_per_second"] / 1e12
                    r["mfu"] = r["tflops"] / peak if peak else None
            tuned = results.get("tuned")
            print(f"\n{model} ({'pretrained' if pretrained else 'random init: macro-F1 not meaningful'}), "
                  f"on {out['device']}:")
            print("| arm | precision | train examples/s | vs tuned | train wall s | val macro-F1 | test macro-F1 |"
                  + (" achieved TFLOP/s | MFU |" if size == "base" else ""))
            print("|---|---|---|---|---|---|---|" + ("---|---|" if size == "base" else ""))
            for arm, r in results.items():
                ratio = r["examples_per_second"] / tuned["examples_per_second"] if tuned else float("nan")
                r["vs_tuned"] = ratio
                val = "-" if r.get("val_macro_f1") is None else f"{r['val_macro_f1']:.4f}"
                line = (f"| {arm} | {r['precision']} | {r['examples_per_second']:.1f} | {ratio:.2f}x | "
                        f"{r['train_seconds']:.1f} | {val} | {r['test_macro_f1']:.4f} |")
                if size == "base":
                    line += f" {r['tflops']:.3g} | " + (f"{100 * r['mfu']:.1f}% |" if r["mfu"] is not None else "n/a |")
                print(line)
            out["models"][model] = {"size": size, "pretrained": pretrained, "results": results}
    if args.json: Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark: `nlpmt predict`'s transformer predictor against `transformers.pipeline("text-classification")`,
same model folder, same texts, same threads, one run.

Arms (each labels the same N AG News texts, after a warm-up on 64 of them):

- **nlpmt**: `TransformerPredictor.predict` as `nlpmt predict` runs it: texts sorted by length into batches of
  64 (little padding), autocast in the precision the model was validated in (bf16 where the CPU has native bf16
  and training used it), `torch.inference_mode`;
- **pipeline**: `pipeline("text-classification", model=FOLDER)` called on the list, as its docs show (batch size
  1), truncating at the same `max_length`;
- **pipeline-b64**: the same with `batch_size=64` (its docs' advice for throughput);
- **pipeline-b64-bf16**: batch 64 with the weights loaded in bf16 (`dtype=torch.bfloat16`), only where the CPU
  has native bf16.

The ratio the README quotes is against the *fastest* pipeline arm. Without `--model`, the folder is the
packaged MiniLM with a 4-class head saved like a trained one (an untrained head: throughput does not depend on
the weights' values); pass `--model` for a trained `models/final/NAME` folder. Agreement is the share of texts
on which an arm's label equals the nlpmt arm's.

    python bench/bench_predict.py                      # 5,000 texts
    python bench/bench_predict.py --texts 1000 --threads 1
"""
import argparse, json, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AG_NEWS = ROOT.parent/"shared"/"data"/"ag_news"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=5000, help="number of texts to label")
    p.add_argument("--model", default=None, help="a saved nlpmt transformer folder (default: packaged MiniLM, 4 labels)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every usable core)")
    p.add_argument("--arms", default="nlpmt,pipeline,pipeline-b64,pipeline-b64-bf16")
    p.add_argument("--raw", default=str(AG_NEWS/"test.csv"), help="headerless AG News CSV: class,title,description")
    return p.parse_args(argv)


def ag_news_texts(path: str, n: int, seed: int = 0) -> list[str]:
    "`n` AG News texts (title + description), in a seeded random order."
    import pandas as pd
    df = pd.read_csv(path, header=None, names=["label", "title", "description"], dtype=str, keep_default_na=False)
    texts = (df["title"] + " " + df["description"]).sample(frac=1, random_state=seed).tolist()
    return (texts * (n // len(texts) + 1))[:n]


def packaged_model_folder(folder: Path) -> Path:
    "The packaged MiniLM with a 4-label head, saved as the stage saves a model (manifest included)."
    from nlpmt.model_integrity import seal_model_folder
    from nlpmt.transformer import choose_precision, load_model_and_tokenizer, training_device
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    tokenizer, model, _ = load_model_and_tokenizer("all-minilm-l6-v2", labels)
    model.save_pretrained(folder); tokenizer.save_pretrained(folder)
    meta = {"kind": "transformer", "model": "all-minilm-l6-v2", "model_name": "all-minilm-l6-v2", "labels": labels,
            "max_length": 128, "truncation": "head", "created": "bench",
            "precision": choose_precision("auto", training_device())}
    (folder/"nlpmt_model.json").write_text(json.dumps(meta))
    seal_model_folder(folder)
    return folder


def timed(fn, texts) -> tuple[float, list[str]]:
    "Seconds and labels of `fn(texts)` after a warm-up call on the first 64 texts."
    fn(texts[:64])
    t0 = time.perf_counter()
    labels = fn(texts)
    return time.perf_counter() - t0, labels


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import pipeline
    from nlpmt.transformer import cpu_supports_bf16, load_predictor, quiet_transformers, set_torch_threads
    threads = set_torch_threads(args.threads)
    texts = ag_news_texts(args.raw, args.texts)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bf16 = cpu_supports_bf16()
    with tempfile.TemporaryDirectory(prefix="nlpmt-bench-predict-") as tmp:
        folder = Path(args.model) if args.model else packaged_model_folder(Path(tmp)/"model")
        predictor = load_predictor(folder)
        max_length = predictor.max_length
        print(f"{len(texts):,} AG News texts, model {folder} ({predictor.precision}, max_length {max_length}), "
              f"{threads} torch thread(s), CPU bf16: {bf16}", flush=True)
        results = {}
        for arm in arms:
            if arm == "nlpmt":
                fn = lambda t: [label for label, _ in predictor.predict(t)]
            elif arm.startswith("pipeline"):
                if arm.endswith("bf16") and not bf16:
                    print(f"{arm}: skipped (no native bf16 on this CPU)"); continue
                with quiet_transformers():
                    pipe = pipeline("text-classification", model=str(folder), device=-1,
                                    dtype=torch.bfloat16 if arm.endswith("bf16") else torch.float32)
                kwargs = {"truncation": True, "max_length": max_length}
                if "b64" in arm: kwargs["batch_size"] = 64
                fn = lambda t, pipe=pipe, kwargs=kwargs: [r["label"] for r in pipe(t, **kwargs)]
            else:
                raise SystemExit(f"unknown arm {arm!r}")
            seconds, labels = timed(fn, texts)
            results[arm] = {"seconds": seconds, "labels": labels}
            print(f"{arm:>18}: {seconds:7.2f} s, {len(texts) / seconds:8.1f} texts/s", flush=True)
    if "nlpmt" not in results: return 0
    ours = results["nlpmt"]
    print(f"\n| arm | seconds | texts/s | nlpmt speed-up | label agreement with nlpmt |\n|---|---|---|---|---|")
    for arm, r in results.items():
        agree = sum(a == b for a, b in zip(r["labels"], ours["labels"])) / len(texts)
        print(f"| {arm} | {r['seconds']:.2f} | {len(texts) / r['seconds']:.1f} | {r['seconds'] / ours['seconds']:.2f}x "
              f"| {agree:.3f} |")
    peers = {a: r for a, r in results.items() if a != "nlpmt"}
    if peers:
        best = min(peers, key=lambda a: peers[a]["seconds"])
        print(f"\nnlpmt predict vs the fastest pipeline arm ({best}): {peers[best]['seconds'] / ours['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Measurements behind two defaults of the transformer stage, each arm a real run of the stage on the same corpus.

- `--study class_weight`: a *skewed* corpus, the shared AG News split with Sci/Tech cut to about 2 % of the rows,
  trained with `class_weight: none` and `balanced`. Prints validation macro-F1 and the minority class's F1
  (validation; test only for the record: nothing is chosen on it).
- `--study max_length`: a *long-text* corpus: each document joins 3-8 AG News texts of one class (disjoint
  groups, so no text is in two splits), a few hundred tokens long, trained with `max_length` 128 and `auto`.
  Prints what auto chose, the truncated share, validation macro-F1 and the seconds of training and prediction.

Both run the real data stage (dedup, stratified 70/10/20 split) into a temporary store, then `train_transformer`.

    python bench/measure_settings.py --study class_weight --train-rows 2000
    python bench/measure_settings.py --study max_length --train-rows 800
"""
import argparse, dataclasses, json, sys, time
from pathlib import Path
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AG_NEWS = ROOT.parent/"shared"/"data"/"ag_news"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=["class_weight", "max_length"], required=True)
    p.add_argument("--model", default="all-minilm-l6-v2", help="model name or folder (default: the packaged MiniLM)")
    p.add_argument("--train-rows", type=int, default=2000, help="stratified sample of the training split (0: all)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--minority-share", type=float, default=0.02, help="class_weight study: share of the cut class")
    p.add_argument("--seeds", default="42", help="comma-separated training seeds (each arm runs once per seed)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: every usable core)")
    p.add_argument("--raw", default=str(AG_NEWS/"test.csv"), help="headerless AG News CSV: class,title,description")
    return p.parse_args(argv)


def read_ag_news(path: str) -> pd.DataFrame:
    "The AG News CSV as text + label name."
    names = (Path(path).parent/"classes.txt").read_text().split("\n")
    df = pd.read_csv(path, header=None, names=["label", "title", "description"], dtype=str, keep_default_na=False)
    return pd.DataFrame({"text": (df["title"] + " " + df["description"]).str.replace("\\", " ", regex=False),
                         "label": [names[int(i) - 1] for i in df["label"]]})


def skewed_corpus(df: pd.DataFrame, minority: str = "Sci/Tech", share: float = 0.02, seed: int = 0) -> pd.DataFrame:
    "All rows of the other classes and a random cut of `minority` to `share` of the result."
    rest = df[df.label != minority]
    n = int(round(share * len(rest) / (1 - share)))
    cut = df[df.label == minority].sample(n=n, random_state=seed)
    return pd.concat([rest, cut]).sample(frac=1, random_state=seed).reset_index(drop=True)


def long_corpus(df: pd.DataFrame, low: int = 3, high: int = 8, seed: int = 0) -> pd.DataFrame:
    "Documents of `low`..`high` texts of one class each, from disjoint groups of rows (no text in two documents)."
    rng, docs = np.random.default_rng(seed), []
    for label, part in df.groupby("label"):
        texts = part["text"].sample(frac=1, random_state=seed).tolist()
        i = 0
        while i + low <= len(texts):
            k = int(rng.integers(low, high + 1))
            docs.append({"text": " ".join(texts[i:i + k]), "label": label}); i += k
    return pd.DataFrame(docs).sample(frac=1, random_state=seed).reset_index(drop=True)


def prepared_store(corpus: pd.DataFrame, config):
    "A temporary store with `corpus` through the real data stage."
    from nlpmt.data import prepare_data
    from nlpmt.storage import temp_store
    store = temp_store("nlpmt-measure-")
    key = "data/raw/corpus.jsonl"
    store.write_text(key, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corpus.to_dict("records")))
    cfg = dataclasses.replace(config.data, raw_path=key, raw_format="jsonl", text_fields=["text"], label_field="label",
                              label_names=sorted(corpus["label"].unique()), label_names_file=None, label_index_base=0,
                              csv_header=True, columns=None)
    prepare_data(cfg, store, progress=False)
    return store


def run_arm(store, config, args, seed: int, **overrides) -> dict:
    "One training run of the stage on `store`; the numbers this study reports."
    from nlpmt.transformer import train_params, train_transformer
    params = train_params(config, model_name=args.model, epochs=args.epochs, max_train_rows=args.train_rows,
                          seed=seed, **overrides)
    t0 = time.perf_counter()
    rec = train_transformer(store, params, config, num_threads=args.threads, progress=True).record
    wall = time.perf_counter() - t0
    return {"rec": rec, "wall": wall}


def main(argv=None) -> int:
    args = parse_args(argv)
    from nlpmt.core import load_config
    config = load_config(ROOT/"configs")
    df = read_ag_news(args.raw)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    if args.study == "class_weight":
        corpus = skewed_corpus(df, share=args.minority_share)
        counts = corpus["label"].value_counts()
        print(f"skewed corpus: {len(corpus):,} rows, {counts.to_dict()}", flush=True)
        store = prepared_store(corpus, config)
        for seed in seeds:
            for mode in ("none", "balanced"):
                out = run_arm(store, config, args, seed, class_weight=mode)
                rec = out["rec"]
                val, test = rec["validation"], rec["test"]
                rows.append({"class_weight": mode, "seed": seed, "val_macro_f1": val["macro_f1"],
                             "val_sci_tech_f1": val["per_class"]["Sci/Tech"]["f1"],
                             "val_min_class_f1": min(v["f1"] for v in val["per_class"].values()),
                             "val_sci_tech_n": val["per_class"]["Sci/Tech"]["support"],
                             "test_macro_f1": test["macro_f1"], "test_sci_tech_f1": test["per_class"]["Sci/Tech"]["f1"],
                             "train_rows": rec["train_rows"], "fit_s": rec["fit_seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    else:
        corpus = long_corpus(df)
        words = corpus["text"].str.split().str.len()
        print(f"long-text corpus: {len(corpus):,} documents, words median {words.median():.0f}, "
              f"95th percentile {words.quantile(0.95):.0f}", flush=True)
        store = prepared_store(corpus, config)
        for seed in seeds:
            for setting in (128, "auto"):
                out = run_arm(store, config, args, seed, max_length=setting)
                rec = out["rec"]
                plan = rec["length_plan"]
                rows.append({"max_length": setting, "seed": seed, "chosen": plan["max_length"],
                             "truncated_share": plan["truncated_share"], "p95_tokens": plan["p95"],
                             "val_macro_f1": rec["validation"]["macro_f1"], "test_macro_f1": rec["test"]["macro_f1"],
                             "train_rows": rec["train_rows"], "train_s": rec["train_seconds"],
                             "fit_s": rec["fit_seconds"], "predict_test_s": rec["predict_seconds"],
                             "wall_s": out["wall"]})
                print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print("\n" + table.round(4).to_string(index=False))
    key = "class_weight" if args.study == "class_weight" else "max_length"
    means = table.groupby(key, sort=False).mean(numeric_only=True).round(4)
    print("\nmean over seeds:\n" + means.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())

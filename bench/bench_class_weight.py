"""Class weights for the baselines on a skewed corpus, in one run: `class_weight: none` against `balanced`.

The corpus is the shared AG News split (`../shared/data/ag_news/test.csv`) with one class cut to about 2 % of
the rows (a different random subset per seed). Each corpus goes through the real data stage (deduplication,
stratified 70/10/20 split) and the real baseline stage (validation-only search, every model of
configs/models_baseline.yaml), once per setting. Printed per model and setting, averaged over the seeds:
validation macro-F1, the minority class's validation F1, and the lowest validation F1 of any class, then
the difference balanced - none. Model selection looks at validation only; test scores are not printed.

    python bench/bench_class_weight.py                    # Business cut to 2 %, seeds 0 1 2
    python bench/bench_class_weight.py --minority World --share 0.02 --seeds 0 1 2 3 4
"""
import argparse, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent/"shared"/"data"/"ag_news"


def skewed_csv(src: Path, dst: Path, minority: str, share: float, seed: int) -> int:
    "Write AG News with class `minority` cut to `share` of all rows; returns the minority rows kept."
    import pandas as pd
    names = (AG_NEWS/"classes.txt").read_text().split()
    df = pd.read_csv(src, header=None, names=["label", "title", "description"], dtype=str, keep_default_na=False)
    code = str(names.index(minority) + 1)                       # 1-based label column
    rest = df[df["label"] != code]
    keep = round(share / (1 - share) * len(rest))
    small = df[df["label"] == code].sample(n=keep, random_state=seed)
    pd.concat([rest, small]).sample(frac=1.0, random_state=seed).to_csv(dst, header=False, index=False)
    return keep


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minority", default="Business", help="class to cut (a name from classes.txt)")
    ap.add_argument("--share", type=float, default=0.02, help="share of all rows the minority class keeps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one skewed corpus and split per seed")
    args = ap.parse_args()
    import pandas as pd
    from nlpmt.core import load_config
    from nlpmt.data import prepare_data
    from nlpmt.baseline import run_baseline
    from nlpmt.storage import temp_store
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            raw = Path(tmp)/f"skewed_{seed}.csv"
            kept = skewed_csv(AG_NEWS/"test.csv", raw, args.minority, args.share, seed)
            data_cfg = load_config(overrides=[f"data.raw_path={raw}", f"data.seed={seed}"])
            store = temp_store()
            report = prepare_data(data_cfg, store, progress=False)
            print(f"seed {seed}: {report['rows_read']} rows, {kept} of class {args.minority!r} "
                  f"({kept / report['rows_read']:.1%})")
            for cw in ("none", "balanced"):
                cfg = load_config(overrides=[f"data.raw_path={raw}", f"data.seed={seed}", f"baseline.class_weight={cw}"])
                run = run_baseline(store, cfg, progress=False)
                for name, rec in run.records.items():
                    per_class = {c: v["f1"] for c, v in rec["validation"]["per_class"].items()}
                    rows.append({"model": name, "class_weight": cw, "seed": seed,
                                 "val_macro_f1": rec["validation"]["macro_f1"],
                                 "val_minority_f1": per_class[args.minority], "val_min_class_f1": min(per_class.values()),
                                 "val_minority_n": rec["validation"]["per_class"][args.minority]["support"]})
    df = pd.DataFrame(rows)
    mean = df.groupby(["model", "class_weight"])[["val_macro_f1", "val_minority_f1", "val_min_class_f1"]].mean()
    print(f"\nValidation scores, mean over seeds {args.seeds} ({args.minority} cut to {args.share:.0%} of rows; "
          f"{int(df['val_minority_n'].mean())} {args.minority} rows in each validation split):")
    print(mean.round(4).to_string())
    diff = (mean.xs("balanced", level="class_weight") - mean.xs("none", level="class_weight")).round(4)
    print("\nbalanced - none:")
    print(diff.to_string())
    zero = df[df["val_min_class_f1"] == 0].groupby(["model", "class_weight"]).size()
    print("\nruns with a class at validation F1 0:", dict(zero) if len(zero) else "none")


if __name__ == "__main__":
    main()

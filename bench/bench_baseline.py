"""Benchmark of two baseline design choices on the shared AG News split (data config defaults), in one run.

1. Solver: logistic regression on the TF-IDF features with `saga` (the baseline's default) against `lbfgs`
   (scikit-learn's default), at C=10: fit seconds, ratio lbfgs/saga, and validation macro-F1 of each.
2. Model format: the baseline's `nlpmt-tfidf-v2` folder against `skops` (the safe alternative; the vectoriser's
   `stop_words_` dropped first where scikit-learn still has it, as its docs advise) and `joblib` (pickle; unsafe
   to load from a shared bucket): bytes on disk, save and load seconds, ratios, and the types skops asks the
   loader to trust.

    python bench/bench_baseline.py              # add --no-skops to skip the (slow) skops part
    python bench/bench_baseline.py --formats-only
    python bench/bench_baseline.py --formats-only --demo-rows 800     # the 800-row demo sample (small vocabulary)
"""
import argparse, os, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    t = time.perf_counter(); out = fn(); return out, time.perf_counter() - t


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else Path(path).stat().st_size


def main():
    ap = argparse.ArgumentParser(); ap.add_argument("--no-skops", action="store_true")
    ap.add_argument("--formats-only", action="store_true", help="skip the solver comparison")
    ap.add_argument("--demo-rows", type=int, default=0, help="use the stratified AG News demo sample of this many rows")
    args = ap.parse_args()
    import numpy as np
    from sklearn.metrics import f1_score
    from nlpmt.core import load_config
    from nlpmt.storage import temp_store, read_split
    from nlpmt.data import prepare_data
    from nlpmt.baseline import make_vectorizer, make_classifier, select_model, save_pipeline, load_pipeline
    config = load_config()          # the project configs (run from the repository)
    store = temp_store()
    if args.demo_rows:
        from nlpmt.data import prepare_demo_data
        report = prepare_demo_data(store, rows=args.demo_rows, seed=0)
    else: report = prepare_data(config, store, progress=False)
    labels = report["labels"]; index = {l: i for i, l in enumerate(labels)}
    train, val = read_split(store, "train", report), read_split(store, "val", report)
    ytr, yva = train["label"].map(index).to_numpy(), val["label"].map(index).to_numpy()
    cfg = config.baseline.models["logreg"]
    vec = make_vectorizer(cfg.tfidf); xtr = vec.fit_transform(train["text"]); xva = vec.transform(val["text"])
    print(f"{'demo sample' if args.demo_rows else 'AG News split'}: train {len(train)}, val {len(val)}; TF-IDF features {xtr.shape[1]}")
    res = {}
    for solver in (() if args.formats_only else ("saga", "lbfgs")):
        clf = make_classifier("logreg", {**cfg.params, "C": 10.0, "solver": solver}, config.baseline.seed)
        _, secs = timed(lambda: clf.fit(xtr, ytr))
        res[solver] = secs
        print(f"  {solver:6s} fit {secs:6.2f} s  n_iter {int(clf.n_iter_[0]):4d}  val macro-F1 "
              f"{f1_score(yva, clf.predict(xva), average='macro'):.4f}")
    if res: print(f"solver: lbfgs / saga fit time = {res['lbfgs'] / res['saga']:.1f}x")

    sel = select_model("logreg", cfg, train["text"], ytr, val["text"], yva, labels, progress=False)
    texts = list(val["text"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = {}
        meta = {"model": "logreg", "model_name": "logreg", "labels": labels}
        _, s = timed(lambda: save_pipeline(sel.pipeline, tmp/"nlpmt", meta))
        (pipe, _), l = timed(lambda: load_pipeline(tmp/"nlpmt"))
        assert (pipe.predict(texts) == sel.pipeline.predict(texts)).all()
        rows["nlpmt-tfidf-v2"] = (folder_bytes(tmp/"nlpmt"), s, l)
        import joblib
        _, s = timed(lambda: joblib.dump(sel.pipeline, tmp/"m.joblib"))
        _, l = timed(lambda: joblib.load(tmp/"m.joblib"))
        rows["joblib (pickle)"] = (folder_bytes(tmp/"m.joblib"), s, l)
        if not args.no_skops:
            import skops.io as sio
            vec = sel.pipeline.named_steps["tfidf"]
            if hasattr(vec, "stop_words_"): del vec.stop_words_     # removed from scikit-learn in 1.8; absent here
            _, s = timed(lambda: sio.dump(sel.pipeline, tmp/"m.skops"))
            untrusted = sio.get_untrusted_types(file=tmp/"m.skops")
            print(f"skops asks the loader to trust {len(untrusted)} types: {untrusted}")
            loaded, l = timed(lambda: sio.load(tmp/"m.skops", trusted=untrusted))
            assert (loaded.predict(texts) == sel.pipeline.predict(texts)).all()
            rows["skops"] = (folder_bytes(tmp/"m.skops"), s, l)
    base = rows["nlpmt-tfidf-v2"]
    print(f"{'format':24s} {'MB':>8s} {'size ratio':>11s} {'save s':>8s} {'load s':>8s} {'load ratio':>11s}")
    for name, (size, s, l) in rows.items():
        print(f"{name:24s} {size / 1e6:8.1f} {size / base[0]:10.1f}x {s:8.2f} {l:8.2f} {l / base[2]:10.1f}x")


if __name__ == "__main__":
    main()

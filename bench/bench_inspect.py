"""Benchmark of `nlpmt data inspect` on 1M rows, against the named alternative: the same facts by hand with pandas
(`pandas.read_csv` / `read_json(lines=True)` of the whole file, fill rate and distinct values per column, label counts,
word-length percentiles of a 2,000-row sample). Our side also guesses the fields and counts tokens with the MiniLM
tokenizer; its time includes loading that tokenizer (`--no-tokens` leaves it out). Each side runs in a fresh process.

    python bench/bench_inspect.py                  # CSV and JSON Lines, 1M rows
    python bench/bench_inspect.py --rows 100000
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent/"shared"/"data"/"ag_news"

PANDAS = """
import sys, time, json, pandas as pd, numpy as np
t = time.perf_counter(); path = sys.argv[1]
df = pd.read_json(path, lines=True, dtype=False) if path.endswith(".jsonl") else pd.read_csv(path, dtype=str, keep_default_na=False)
facts = {c: (float(df[c].astype(bool).mean()), int(df[c].nunique())) for c in df.columns}
counts = df["label"].value_counts().to_dict()
words = df["text"].sample(2000, random_state=0).str.split().str.len()
pct = np.percentile(words, [50, 90, 95, 99]).tolist()
print(json.dumps({"seconds": time.perf_counter() - t, "labels": len(counts)}))
"""
OURS = """
import sys, time, json
t = time.perf_counter()
from nlpmt.core import load_config
from nlpmt.datasets import inspect_data
import nlpmt.datasets as d
if sys.argv[2] == "no": d.token_lengths = lambda texts, model: (None, "skipped")
info = inspect_data(sys.argv[1], load_config())
print(json.dumps({"seconds": time.perf_counter() - t, "labels": info["n_labels"], "sampled": info["sampled"],
                  "rows": info["rows"], "text_fields": info["text_fields"], "label_field": info["label_field"]}))
"""


def synthesise(n: int, folder: Path) -> dict[str, Path]:
    "A CSV (text,label header) and a JSON Lines file of n AG News-based rows with unique texts."
    import numpy as np, pandas as pd
    src = pd.read_csv(AG_NEWS/"test.csv", header=None, names=["label", "title", "description"], dtype=str, keep_default_na=False)
    df = src.iloc[np.random.default_rng(0).integers(0, len(src), n)].reset_index(drop=True)
    out = pd.DataFrame({"text": df.title + " " + df.description + " (ref " + pd.Series(np.arange(n)).astype(str) + ")",
                        "label": df.label.map(dict(zip("1234", ["World", "Sports", "Business", "Sci/Tech"])))})
    paths = {"csv": folder/"big.csv", "jsonl": folder/"big.jsonl"}
    out.to_csv(paths["csv"], index=False)
    out.to_json(paths["jsonl"], orient="records", lines=True, force_ascii=False)
    return paths


def timed(code: str, *args) -> dict:
    "Run `code` in a fresh Python process; its last stdout line is JSON."
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "NLPMT_ROOT": str(ROOT), "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode: sys.exit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--no-tokens", action="store_true", help="leave the tokenizer out of our side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nlpmt-bench-") as tmp:
        paths = synthesise(args.rows, Path(tmp))
        print(f"{'file':>6} {'MB':>6} {'inspect s':>10} {'pandas s':>9} {'ratio':>6}  what inspect read")
        for fmt, path in paths.items():
            ours = timed(OURS, path, "no" if args.no_tokens else "yes")
            theirs = timed(PANDAS, path)
            assert ours["labels"] == theirs["labels"] == 4 and ours["label_field"] == "label"
            how = f"a random sample (of {ours['rows']:,} lines)" if ours["sampled"] else f"all {ours['rows']:,} rows"
            print(f"{fmt:>6} {path.stat().st_size / 1e6:>6.0f} {ours['seconds']:>10.1f} {theirs['seconds']:>9.1f} "
                  f"{ours['seconds'] / theirs['seconds']:>6.2f}  {how}", flush=True)
    print(f"\nratio = inspect / pandas by hand (below 1: inspect is faster); inspect also guesses the fields and, unless "
          f"--no-tokens, loads the MiniLM tokenizer. CPUs: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

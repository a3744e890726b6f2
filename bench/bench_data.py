"""Benchmark of the data stage (`nlpmt.data.prepare_data`) on 10k, 100k and 1M rows.

The rows are synthesised from the shared AG News file: each row is an AG News row whose description gets a
unique suffix (so texts are distinct), except for controlled duplicates: 3% exact copies of an earlier row and
2% copies that differ only in case and punctuation (normalised duplicates). Each size runs in a fresh Python
process so its peak memory (max RSS) is its own. The named alternative for the time is linear scaling from the
smallest run: `ratio = (t_N / t_10k) / (N / 10k)` (1.0 = perfectly linear, > 1 = worse than linear).

    python bench/bench_data.py                 # 10k, 100k, 1M
    python bench/bench_data.py --sizes 10000 100000
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent/"shared"/"data"/"ag_news"
EXACT_DUP, NORM_DUP = 0.03, 0.02


def synthesise(n: int, folder: Path, seed: int = 0) -> Path:
    "Write an n-row AG News-layout CSV (plus classes.txt) with controlled duplicates; returns its path."
    import numpy as np, pandas as pd
    src = pd.read_csv(AG_NEWS/"test.csv", header=None, names=["label", "title", "description"], dtype=str, keep_default_na=False)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(src), n)
    df = src.iloc[pick].reset_index(drop=True)
    df["description"] = df["description"] + " (ref " + pd.Series(np.arange(n)).astype(str) + ")"
    kind = rng.random(n)
    exact = np.flatnonzero((kind < EXACT_DUP) & (np.arange(n) > 0))
    norm = np.flatnonzero((kind >= EXACT_DUP) & (kind < EXACT_DUP + NORM_DUP) & (np.arange(n) > 0))
    for rows, upper in ((exact, False), (norm, True)):
        orig = (rng.random(len(rows)) * rows).astype(int)          # an earlier row
        copy = df.iloc[orig][["label", "title", "description"]].to_numpy()
        if upper: copy[:, 1] = [t.upper() + "!" for t in copy[:, 1]]
        df.iloc[rows, :] = copy
    path = folder/f"ag_news_{n}.csv"
    df.to_csv(path, header=False, index=False)
    (folder/"classes.txt").write_bytes((AG_NEWS/"classes.txt").read_bytes())
    return path


def run_one(path: str) -> dict:
    "Run the stage once on `path` in this process; returns timing and memory."
    from nlpmt.core import load_config
    from nlpmt.data import prepare_data
    from nlpmt.storage import temp_store
    import numpy, pandas, pyarrow, matplotlib.figure  # imports are not part of the timed stage
    config = load_config(ROOT/"configs")
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    report = prepare_data(config, temp_store("nlpmt-bench-"), progress=False, raw_path=path)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_rss_mb": peak, "base_rss_mb": base_rss, "rows_read": report["rows_read"],
            "rows_kept": report["rows_kept"], "dropped": {k: v for k, v in report["dropped"].items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one: print(json.dumps(run_one(args.one))); return
    if not (AG_NEWS/"test.csv").exists(): sys.exit(f"AG News not found at {AG_NEWS}")
    results = []
    with tempfile.TemporaryDirectory(prefix="nlpmt-bench-") as tmp:
        for n in args.sizes:
            t = time.perf_counter(); path = synthesise(n, Path(tmp)); gen = time.perf_counter() - t
            out = subprocess.run([sys.executable, __file__, "--one", str(path)], capture_output=True, text=True,
                                 env={**os.environ, "NLPMT_ROOT": str(ROOT)})
            if out.returncode: sys.exit(f"run on {n} rows failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1]); r["rows"] = n; r["file_mb"] = path.stat().st_size / 1e6
            results.append(r)
            print(f"synthesised {n:,} rows ({r['file_mb']:.0f} MB) in {gen:.1f}s; dropped {r['dropped']}", flush=True)
    t0, n0 = results[0]["seconds"], results[0]["rows"]
    print(f"\n{'rows':>10} {'seconds':>8} {'rows/s':>10} {'peak RSS MB':>12} {'stage MB':>9} {'vs linear':>10} {'vs prev':>8}")
    for i, r in enumerate(results):
        ratio = (r["seconds"] / t0) / (r["rows"] / n0)
        prev = results[i - 1] if i else r
        step = (r["seconds"] / prev["seconds"]) / (r["rows"] / prev["rows"])
        print(f"{r['rows']:>10,} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>10,.0f} {r['peak_rss_mb']:>12,.0f} "
              f"{r['peak_rss_mb'] - r['base_rss_mb']:>9,.0f} {ratio:>10.2f} {step:>8.2f}")
    print(f"\nvs linear = (t_N / t_{n0:,}) / (N / {n0:,}): time against linear scaling from the {n0:,}-row run; "
          "vs prev: the same against the previous size. 1.00 = linear, below 1 = fixed costs (imports, figures) "
          f"amortised, above 1 = worse than linear. Target: 1M rows < 30 s. CPUs: {os.cpu_count()}, "
          f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

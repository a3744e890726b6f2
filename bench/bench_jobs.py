"""Overhead of running a stage as a job: the data stage through the local backend (`nlpmt run data`: CLI, runner
subprocess, papermill, kernel, executed notebook and log saved to the store) against calling the stage's function
directly (`nlpmt.data.prepare_data` in a fresh Python process). Both write the same splits into a fresh store.

    python bench/bench_jobs.py [--repeats 3]

Prints the median wall time of each, the overhead (job minus direct) and, to show where it goes, the time the
notebook's own cells took inside the job. Target: overhead under 3 s.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECT = "from nlpmt.data import prepare_data; prepare_data(store={store!r}, progress=False)"


def timed(cmd: list[str]) -> float:
    "Wall seconds of a command (run from the project root); fails loudly if it fails."
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode: sys.exit(f"{' '.join(cmd[:4])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def cell_seconds(store: Path) -> float:
    "Seconds the executed notebook's cells took (papermill records each cell's duration)."
    nb_path = next(store.glob("results/notebooks/*/data.ipynb"))
    cells = json.loads(nb_path.read_text())["cells"]
    return sum(c.get("metadata", {}).get("papermill", {}).get("duration") or 0 for c in cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    nlpmt = str(Path(sys.executable).parent/"nlpmt")
    direct, job, cells = [], [], []
    timed([sys.executable, "-c", "import nlpmt.data, papermill"])   # warm the file cache for both sides
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            direct.append(timed([sys.executable, "-c", DIRECT.format(store=a)]))
            job.append(timed([nlpmt, "run", "data", "--store", b]))
            cells.append(cell_seconds(Path(b)))
    d, j, c = statistics.median(direct), statistics.median(job), statistics.median(cells)
    print(f"data stage, median of {args.repeats} runs on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f})")
    print(f"  direct  (python -c prepare_data(...))     {d:6.2f} s")
    print(f"  job     (nlpmt run data, local backend)   {j:6.2f} s   of which notebook cells {c:.2f} s")
    print(f"  overhead: {j - d:.2f} s ({j / d:.2f}x direct); job machinery outside the cells: {j - c:.2f} s "
          f"(target < 3 s: {'met' if j - d < 3 else 'NOT met'})")
    print(f"  best pair: overhead {min(b - a for a, b in zip(direct, job)):.2f} s")


if __name__ == "__main__":
    main()

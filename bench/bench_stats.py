"""The report's statistics against `scipy.stats`, in one run: does the library do it as fast as our code?

1. Bootstrap: 95% percentile interval of macro-F1 from B resamples of n test examples (default 10,000 x 10,000,
   4 classes), for one model and for the paired difference of two models. Ours: `nlpmt.significance.bootstrap_scores`
   (one seeded index matrix, confusion matrices by `np.bincount`, accuracy and macro-F1 together, resamples shared
   by every model). scipy: `scipy.stats.bootstrap(..., paired=True, vectorized=True)` with the same vectorised
   macro-F1 statistic, `method="percentile"` (what we report) and its default `"BCa"`.
2. McNemar's exact test: the hand-written binomial tail summed in exact integers with `math.comb` (what
   `nlpmt.significance.mcnemar_test` used before; kept here as `exact_tail_by_hand`) against `scipy.stats.binomtest`
   (what it uses now) on the same discordant counts.

Prints seconds, the ratio scipy / ours (above 1: scipy is slower) and how far the intervals and p-values agree.

    python bench/bench_stats.py                     # n = B = 10,000
    python bench/bench_stats.py --n 2000 --resamples 2000
"""
import argparse, math, time
import numpy as np


def timed(fn, repeat: int = 1):
    "Best wall time of `repeat` calls, and the last result."
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t)
    return out, best


def exact_tail_by_hand(b: int, c: int) -> float:
    "Two-sided exact McNemar p-value as a binomial tail in exact integer arithmetic (the report's former code)."
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def macro_f1_stat(k: int):
    "A vectorised macro-F1 statistic for scipy.stats.bootstrap: (y_true, y_pred) with resamples along the last axis."
    def stat(y, p, axis=-1):
        y, p = np.moveaxis(np.asarray(y), axis, -1), np.moveaxis(np.asarray(p), axis, -1)
        lead = y.shape[:-1]
        y2, p2 = y.reshape(-1, y.shape[-1]), p.reshape(-1, p.shape[-1])
        b = y2.shape[0]
        flat = (y2 * k + p2) + (np.arange(b) * k * k)[:, None]
        cm = np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k).astype(float)
        tp = np.diagonal(cm, axis1=1, axis2=2); denom = cm.sum(2) + cm.sum(1)
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean(1)
        return f1.reshape(lead)
    return stat


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="test examples")
    ap.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=200, help="scipy's batch (resamples per vectorised call; bounds memory)")
    ap.add_argument("--no-bca", action="store_true", help="skip scipy's BCa run (its jackknife is slow)")
    args = ap.parse_args()
    from scipy import stats
    from nlpmt.significance import bootstrap_scores, percentile_interval, paired_bootstrap
    n, B, k = args.n, args.resamples, args.classes
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, n)
    pa = np.where(rng.random(n) < 0.90, y, rng.integers(0, k, n))
    pb = np.where(rng.random(n) < 0.88, y, rng.integers(0, k, n))
    f1 = macro_f1_stat(k)
    print(f"bootstrap: n={n:,} examples, B={B:,} resamples, {k} classes (macro-F1, 95% percentile interval)")

    bootstrap_scores(y[:100], {"a": pa[:100]}, k, 10, seed=1)                     # warm-up: first calls of both
    stats.bootstrap((y[:100], pa[:100]), f1, paired=True, vectorized=True, n_resamples=10, method="percentile")
    ours, t_ours = timed(lambda: bootstrap_scores(y, {"a": pa}, k, B, seed=1))
    ci_ours = percentile_interval(ours["a"]["macro_f1"])
    sp, t_sp = timed(lambda: stats.bootstrap((y, pa), f1, paired=True, vectorized=True, n_resamples=B, batch=args.batch,
                                             method="percentile", rng=np.random.default_rng(1)))
    ci_sp = (sp.confidence_interval.low, sp.confidence_interval.high)
    print(f"  one model     ours {t_ours:6.2f} s  [{ci_ours[0]:.4f}, {ci_ours[1]:.4f}] (accuracy too)")
    print(f"                scipy percentile {t_sp:6.2f} s  [{ci_sp[0]:.4f}, {ci_sp[1]:.4f}]   scipy/ours = {t_sp / t_ours:.2f}x")
    if not args.no_bca:
        bca, t_bca = timed(lambda: stats.bootstrap((y, pa), f1, paired=True, vectorized=True, n_resamples=B,
                                                   batch=args.batch, method="BCa", rng=np.random.default_rng(1)))
        print(f"                scipy BCa        {t_bca:6.2f} s  [{bca.confidence_interval.low:.4f}, "
              f"{bca.confidence_interval.high:.4f}]   scipy/ours = {t_bca / t_ours:.2f}x")

    def ours_paired():
        boot = bootstrap_scores(y, {"a": pa, "b": pb}, k, B, seed=1)
        return paired_bootstrap(boot["a"]["macro_f1"], boot["b"]["macro_f1"], 0.0)
    pd_ours, t_pours = timed(ours_paired)
    diff = lambda yy, a, b, axis=-1: f1(yy, a, axis) - f1(yy, b, axis)
    pd_sp, t_psp = timed(lambda: stats.bootstrap((y, pa, pb), diff, paired=True, vectorized=True, n_resamples=B,
                                                 batch=args.batch, method="percentile", rng=np.random.default_rng(1)))
    print(f"  paired diff   ours {t_pours:6.2f} s  [{pd_ours['lo']:.4f}, {pd_ours['hi']:.4f}] (+ p-value, + accuracy)")
    print(f"                scipy percentile {t_psp:6.2f} s  [{pd_sp.confidence_interval.low:.4f}, "
          f"{pd_sp.confidence_interval.high:.4f}]   scipy/ours = {t_psp / t_pours:.2f}x")

    print("McNemar exact p-value (two-sided binomial test on the discordant pairs):")
    for b, c in [(60, 40), (900, 800), (3000, 2900)]:
        calls = 200 if b + c < 1000 else 5
        mine, t_m = timed(lambda: [exact_tail_by_hand(b, c) for _ in range(calls)])
        theirs, t_s = timed(lambda: [stats.binomtest(min(b, c), b + c, 0.5).pvalue for _ in range(calls)])
        print(f"  b={b:5d} c={c:5d}: by hand {t_m / calls * 1e3:8.2f} ms/call  scipy.binomtest {t_s / calls * 1e3:6.2f} "
              f"ms/call  scipy/by hand = {t_s / t_m:.3f}x   p {mine[0]:.6g} vs {theirs[0]:.6g}")


if __name__ == "__main__":
    main()

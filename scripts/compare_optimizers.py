"""Compare optimizers at equal budgets on one search config, over a few seeds.

    python scripts/compare_optimizers.py search_spaces/demo.yaml --kinds cma optuna-tpe random \
        --seeds 0 1 2 --max-evals 48 [--workers 2] [--png compare.png]

Prints the mean (and spread) of the best dev fitness found after 25%, 50%, 75% and 100% of the
budget for each optimizer, and plots the mean best-so-far curves.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import yaml

from evomerge.run import search
from evomerge.run_dir import TrialRecord, read_trials


def best_so_far(trials: list[TrialRecord]) -> list[float]:
    curve, best = [], float("-inf")
    for t in trials:
        if t.fitness is not None:
            best = max(best, t.fitness)
        curve.append(best)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path)
    parser.add_argument("--kinds", nargs="+", default=["cma", "optuna-tpe", "random"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-evals", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--png", type=Path, default=Path("compare_optimizers.png"))
    args = parser.parse_args()

    raw = yaml.safe_load(args.config.read_text())
    curves: dict[str, list[list[float]]] = {}
    root = Path(tempfile.mkdtemp(prefix="evomerge-compare-"))
    for kind in args.kinds:
        for seed in args.seeds:
            cfg = {**raw, "optimizer": {**raw.get("optimizer", {}), "kind": kind, "seed": seed}}
            if kind != "cma":
                cfg["optimizer"] = {
                    k: v for k, v in cfg["optimizer"].items() if k in ("kind", "seed")
                }
            path = root / f"{kind}-{seed}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            summary = search(
                path,
                run_dir=root / f"run-{kind}-{seed}",
                max_evals=args.max_evals,
                workers=args.workers,
                progress=False,
            )
            curve = best_so_far(read_trials(summary.run_dir))
            curves.setdefault(kind, []).append(curve)
            print(
                f"{kind:12} seed {seed}: best {curve[-1]:.4f} after {len(curve)} evals ({summary.seconds:.0f} s)",
                flush=True,
            )

    marks = [max(1, round(args.max_evals * f)) for f in (0.25, 0.5, 0.75, 1.0)]
    print(f"\nbest dev fitness so far, mean ± std over seeds {args.seeds}")
    print("| optimizer | " + " | ".join(f"after {m}" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for kind, runs in curves.items():
        cells = []
        for m in marks:
            values = [c[min(m, len(c)) - 1] for c in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, runs in curves.items():
        n = min(len(c) for c in runs)
        mean = [statistics.mean(c[i] for c in runs) for i in range(n)]
        ax.plot(range(1, n + 1), mean, label=kind)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best dev fitness (mean over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()

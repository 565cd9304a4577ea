"""Search throughput: candidates per minute for 1 and 2 workers, and merge vs score time per candidate.

    python scripts/bench_search.py [search_spaces/demo.yaml] [--evals 24] [--cost 0.5]

Part 1 replaces lm-eval with a fixed-cost scorer (the real in-memory merge still runs, then the
worker sleeps `--cost` seconds), so the numbers show the pool's overhead and scaling, not the
scorer's. Part 2 runs the real scorer and reports the share of each candidate's time spent merging.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from evomerge.run import search
from evomerge.run_dir import TrialRecord, read_trials
from evomerge.workers import CandidateEvaluator, Job, TrialResult, make_pool

COST_SECONDS = 0.5


class FixedCostEvaluator(CandidateEvaluator):
    """Merges for real, then 'scores' in a fixed time."""

    def evaluate(self, job: Job) -> TrialResult:
        from evomerge.merge import merge_to_state_dict
        from evomerge.recipe import Recipe

        t0 = time.perf_counter()
        state = merge_to_state_dict(
            Recipe.from_dict(job.recipe), self.sources, device=self.device, seed=self.setup.seed
        )
        self.load_weights(state)
        merge = time.perf_counter() - t0
        time.sleep(COST_SECONDS)
        fitness = (
            job.candidate_id * 37 % 101
        ) / 101  # arbitrary but deterministic: throughput does not depend on it
        return TrialResult(
            job.candidate_id, "ok", fitness, {}, None, merge, COST_SECONDS, self.name
        )


def run(config: Path, evals: int, workers: int, fixed: bool) -> tuple[float, list[TrialRecord]]:
    root = Path(tempfile.mkdtemp(prefix="evomerge-bench-search-"))
    factory = (lambda s, n: make_pool(s, n, evaluator_cls=FixedCostEvaluator)) if fixed else None
    t0 = time.perf_counter()
    search(
        config,
        run_dir=root / "run",
        max_evals=evals,
        workers=workers,
        progress=False,
        pool_factory=factory,
    )
    return time.perf_counter() - t0, read_trials(root / "run")


def main() -> None:
    global COST_SECONDS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, nargs="?", default=Path("search_spaces/demo.yaml"))
    parser.add_argument("--evals", type=int, default=24)
    parser.add_argument("--cost", type=float, default=COST_SECONDS)
    args = parser.parse_args()
    COST_SECONDS = args.cost

    print(f"fixed-cost scorer ({COST_SECONDS} s per candidate), {args.evals} candidates:")
    rates = {}
    for workers in (1, 2):
        wall, trials = run(args.config, args.evals, workers, fixed=True)
        # steady state: time between the first and the last finished candidate (excludes worker start-up)
        stamps = sorted(t.finished_at for t in trials)
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60
        rates[workers] = rate
        merge = statistics.median(t.merge_seconds for t in trials)
        print(
            f"  {workers} worker(s): {rate:6.1f} candidates/min steady state (ideal {60 / (COST_SECONDS + merge) * workers:.1f}), {wall:.1f} s wall incl. start-up"
        )
    print(f"  scaling 1 -> 2 workers: {rates[2] / rates[1]:.2f}x")

    wall, trials = run(args.config, args.evals, 2, fixed=False)
    ok = [t for t in trials if t.status == "ok"]
    merge = statistics.median(t.merge_seconds for t in ok)
    score = statistics.median(t.score_seconds for t in ok)
    stamps = sorted(t.finished_at for t in ok)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) * 60
    print(f"\nreal lm-eval scorer, 2 workers, {len(ok)} candidates: {rate:.1f} candidates/min")
    print(
        f"  per candidate (median): merge {merge * 1000:.0f} ms, score {score * 1000:.0f} ms -> merging is {100 * merge / (merge + score):.1f}% of the candidate's time"
    )


if __name__ == "__main__":
    main()

"""Wall time of one in-memory scoring of a zoo model on the demo's dev tasks (the search's inner loop).

    python scripts/bench_score.py [--repeats 7] [--tasks zoo_addition_dev,zoo_reversal_dev,zoo_shift_dev]

The `Scorer` is built once (task index, datasets, lm-eval requests), then scores the same live
model again and again, as a worker does for each candidate.
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate import Scorer
from evomerge.zoo.build import build_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tasks", default="zoo_addition_dev,zoo_reversal_dev,zoo_shift_dev")
    args = parser.parse_args()

    zoo = build_zoo()
    started = time.perf_counter()
    scorer = Scorer(args.tasks.split(","))
    setup = time.perf_counter() - started
    requests = sum(len(prepared.task.instances) for prepared in scorer.tasks.values())
    model = AutoModelForCausalLM.from_pretrained(zoo.specialists["reversal"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(zoo.specialists["reversal"])
    times = [scorer.score(model, tokenizer).seconds for _ in range(args.repeats)]
    print(f"scorer set-up, once per worker: {setup:.2f} s")
    print(
        f"one scoring, {len(scorer.tasks)} tasks, {requests} loglikelihood requests: "
        f"median {statistics.median(times):.3f} s, min {min(times):.3f} s over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()

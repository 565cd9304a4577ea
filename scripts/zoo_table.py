"""The demo zoo's table: base, each specialist and the default merges, on the held-out test splits.

    python scripts/zoo_table.py [search_spaces/demo.yaml] [--gen]

Builds the zoo if needed, then scores with lm-eval (the same scorer the search uses) every source
model and every `baselines:` recipe of the config on its `test_tasks` (multiple choice, accuracy).
`--gen` scores the generation variants instead (greedy decoding, exact match). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from evomerge.preflight import resolve_tasks
from evomerge.report import evaluate_rows, markdown_table
from evomerge.search_config import load_search_config
from evomerge.task_index import TaskSpec


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, nargs="?", default=Path("search_spaces/demo.yaml"))
    parser.add_argument(
        "--gen", action="store_true", help="exact match of greedy generations (zoo_*_test_gen)"
    )
    args = parser.parse_args()

    config, _ = load_search_config(args.config)
    if args.gen:
        gen = [TaskSpec(f"{t.name}_gen", "exact_match") for t in config.test_tasks]
        config = config.model_copy(update={"test_tasks": gen})
    config = resolve_tasks(config)  # concrete metric keys: the table reads them
    started = time.perf_counter()
    rows = evaluate_rows(config, None)
    print(markdown_table(rows, config))
    print(f"scored {len(rows)} models in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

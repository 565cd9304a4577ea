"""lm-eval `custom_dataset` loader for the zoo tasks: reads data/<data_file> next to this file.

A plain `dataset_kwargs.data_files` path would be resolved against the current directory;
this loader makes the tasks work from any directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def load(data_file: str, **_metadata: Any) -> datasets.DatasetDict:
    """The JSONL file as the task's `test` split; lm-eval passes task metadata too, unused here."""
    path = DATA_DIR / data_file
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

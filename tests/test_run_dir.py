"""The run directory's trial log: TrialRecord reads and writes trials.jsonl lines unchanged."""

from __future__ import annotations

import json

from evomerge.run_dir import TRIALS_FILE, TrialLog, TrialRecord, read_trials, recipe_hash
from evomerge.workers import TrialResult

RECIPE = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}}]}

# a line as the search loop wrote it before TrialRecord existed (a json.dumps of a dict)
LINE = json.dumps(
    {
        "id": 3,
        "status": "ok",
        "fitness": 0.4166666666666667,
        "objectives": [0.5, 0.3333333333333333],
        "metrics": {"zoo_a": {"acc": 0.5}, "zoo_b": {"acc": 0.3333333333333333}},
        "error": None,
        "x": [0.1, 0.9250000000000002],
        "recipe_hash": recipe_hash(RECIPE),
        "recipe": RECIPE,
        "merge_seconds": 0.0241,
        "score_seconds": 0.5713,
        "wall_seconds": 0.6012,
        "worker": "host:123",
        "finished_at": 1764000000.123456,
    }
)


def test_a_line_reads_and_writes_back_byte_for_byte():
    record = TrialRecord.from_json(LINE)
    assert record.id == 3 and record.fitness == 0.4166666666666667 and record.worker == "host:123"
    assert record.objectives == (0.5, 0.3333333333333333) and record.x == (0.1, 0.9250000000000002)
    assert record.to_json() == LINE


def test_a_failed_trial_and_unknown_or_missing_keys():
    failed = json.dumps(
        {"id": 1, "status": "failed", "fitness": None, "objectives": [], "metrics": {}, "x": None}
    )
    record = TrialRecord.from_json(failed)
    assert record.fitness is None and record.objectives == () and record.x is None
    # a log written before `objectives` existed, and a key this version does not know
    old = TrialRecord.from_json(json.dumps({"id": 0, "status": "ok", "fitness": 0.5, "note": 1}))
    assert old.objectives == () and old.extra == {"note": 1}
    assert json.loads(old.to_json())["note"] == 1
    assert TrialRecord.from_json(old.to_json()) == old


def test_the_record_of_a_finished_trial(tmp_path):
    result = TrialResult(7, "ok", 0.25, {"t": {"acc": 0.25}}, None, 0.123456, 1.5, "w:1", (0.25,))
    record = TrialRecord.from_result(result, x=(0.5,), recipe=RECIPE, wall_seconds=2.000049)
    assert (record.merge_seconds, record.wall_seconds) == (0.1235, 2.0)
    assert record.recipe_hash == recipe_hash(RECIPE) and record.to_recipe().merge_method == "linear"
    log = TrialLog(tmp_path / TRIALS_FILE)
    log.append(record)
    log.append(TrialRecord.from_json(LINE))
    with (tmp_path / TRIALS_FILE).open("a") as f:
        f.write(LINE[:40])  # a line cut short by a crash
    assert read_trials(tmp_path) == [record, TrialRecord.from_json(LINE)]
    assert (tmp_path / TRIALS_FILE).read_text().splitlines()[1] == LINE

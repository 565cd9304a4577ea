"""evomerge: evolve LLM merge recipes."""

import os

# OpenMP threads that spin while they wait hold the cores that the thread they wait for needs as soon
# as other processes compete for them (in a search, workers merge while their neighbours score): a TIES
# merge under load ran 7x slower with spinning threads (scripts/bench_merge.py, the loaded row). Set
# before torch loads its OpenMP runtime; a value the user set wins. Ray workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

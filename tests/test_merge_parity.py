"""tunekit merge == mergekit 0.1.5 on tiny models, for every deterministic method and for slices/passthrough.

The expected tensors were written once by mergekit itself (tests/fixtures/merge/make_parity.py, command in its
docstring); the inputs are rebuilt here bit for bit by the same seeded script, so mergekit is not a test
dependency.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tunekit.merge.config import validate_config
from tunekit.merge.engine import merge_models
from tunekit.merge.io import SafetensorsFolder

FIXTURES = Path(__file__).parent / "fixtures" / "merge"
_spec = importlib.util.spec_from_file_location("make_parity", FIXTURES / "make_parity.py")
make_parity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_parity)
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory):
    return make_parity.build_models(tmp_path_factory.mktemp("parity"))


def _expected(key: str) -> dict[str, torch.Tensor]:
    with safe_open(str(FIXTURES / "expected.safetensors"), framework="pt") as fh:
        return {n.split("/", 1)[1]: fh.get_tensor(n) for n in fh.keys() if n.startswith(key + "/")}


@pytest.mark.parametrize("key", sorted(make_parity.CONFIGS))
def test_matches_mergekit(key, parity_models, tmp_path):
    cfg = validate_config(make_parity.fill(make_parity.CONFIGS[key], parity_models), source=key)
    out = merge_models(cfg, tmp_path / "out", progress=False, log=lambda m: None)
    meta = EXPECTED[key]
    got = SafetensorsFolder(out)
    assert {n: list(got.info(n).shape) for n in got.names()} == meta["shapes"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == meta["num_hidden_layers"]
    expected = _expected(key)
    assert len(expected) == len(make_parity.KEPT)
    for name, want in expected.items():
        have = got.read(name)
        assert have.dtype == torch.float32
        assert torch.allclose(have, want, rtol=1e-5, atol=1e-6), (name, (have - want).abs().max())


@pytest.fixture(scope="module")
def token_models(tmp_path_factory):
    return make_parity.build_token_models(tmp_path_factory.mktemp("parity_tok"))


@pytest.mark.parametrize("key", sorted(make_parity.TOKENIZER_CONFIGS))
def test_tokenizer_merges_match_mergekit(key, token_models, tmp_path):
    from transformers import AutoTokenizer

    cfg = validate_config(make_parity.fill(make_parity.TOKENIZER_CONFIGS[key], token_models), source=key)
    out = merge_models(cfg, tmp_path / "out", progress=False, log=lambda m: None)
    got = SafetensorsFolder(out)
    with safe_open(str(FIXTURES / "expected_tokenizer.safetensors"), framework="pt") as fh:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = fh.get_tensor(f"{key}/{name}/rows")
            want = fh.get_tensor(f"{key}/{name}")
            have = got.read(name)
            assert have.shape[0] == int(rows[-1]) + 1  # same vocabulary size (padding included)
            assert torch.allclose(have[rows], want, rtol=1e-5, atol=1e-5), (name, (have[rows] - want).abs().max())
    tok = AutoTokenizer.from_pretrained(out)
    assert all(t in tok.get_vocab() for t in make_parity.EXTRA_TOKENS)

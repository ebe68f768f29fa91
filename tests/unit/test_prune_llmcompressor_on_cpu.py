"""effsft uniform Wanda/SparseGPT vs llm-compressor's modifiers (runs only where llmcompressor imports).

llmcompressor pins transformers <= 5.17, so it lives in its own environment; see
benchmarks/LLMC_CROSSCHECK.md. In effsft's main environment this file is skipped.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "crosscheck_llmcompressor.py"
_spec = importlib.util.spec_from_file_location("crosscheck_llmcompressor", _SCRIPT)
xc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(xc)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = xc.random_llama(hidden=64, inter=128, layers=2, vocab=128, seed=0)
    calib = xc.random_ids(8, 32, 128, seed=1)
    return model, xc.placeholder_tokenizer(128), calib


def _pair(setup, criterion, aligned):
    model, tok, calib = setup
    kw = dict(sparsity=0.5, batch_size=4, blocksize=128, percdamp=0.01)
    m_llmc, m_eff = copy.deepcopy(model), copy.deepcopy(model)
    xc.run_llmcompressor(m_llmc, tok, calib, criterion, **kw)
    with xc.public_count(criterion) if aligned else xc.contextlib.nullcontext():
        xc.run_effsft(m_eff, calib, criterion, **kw)
    return xc.summarize(xc.compare(m_eff, m_llmc))


def test_wanda_masks_identical(setup):
    s = _pair(setup, "wanda", aligned=False)
    assert s["equal_masks"] == s["matrices"] and s["max_abs_weight_diff"] == 0.0


def test_sparsegpt_same_masks_with_public_count(setup):
    s = _pair(setup, "sparsegpt", aligned=True)
    assert s["equal_masks"] == s["matrices"]
    assert s["max_abs_weight_diff"] < 1e-4


def test_sparsegpt_default_count_differs_by_one_per_block(setup):
    # effsft prunes round(s·n) per 128-column block, llm-compressor int(s·n) + 1
    s = _pair(setup, "sparsegpt", aligned=False)
    assert s["sparsity_effsft"] == 0.5 and s["sparsity_llmc"] > 0.5
    assert s["mask_agree_weighted"] > 0.99

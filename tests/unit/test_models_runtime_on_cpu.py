import hashlib

import pytest
import torch

from effsft.models.loading import ModelPathError, load_model, load_tokenizer
from effsft.models.tiny import write_tiny_model
from effsft.report.manifest import fingerprint
from effsft.runtime import OutputDir, OutputExists

TEXTS = ["Compute 12 + 30.\nAnswer: 42", "Reverse 'abc'. cba", "What is the capital of Zorb?"] * 30


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_deterministic_and_loads(tmp_path, family):
    a = write_tiny_model(tmp_path / "a", family, texts=TEXTS, seed=1, vocab_size=300)
    b = write_tiny_model(tmp_path / "b", family, texts=TEXTS, seed=1, vocab_size=300)
    c = write_tiny_model(tmp_path / "c", family, texts=TEXTS, seed=2, vocab_size=300)
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(a / f) == _digest(b / f), f
    assert _digest(a / "model.safetensors") != _digest(c / "model.safetensors")
    tok = load_tokenizer(a)
    model = load_model(a, dtype="float32")
    assert model.config.model_type == family
    ids = torch.tensor([tok("Compute 1 + 2.")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    assert tok.chat_template  # the offline tokenizer ships the default template


def test_load_errors(tmp_path):
    with pytest.raises(ModelPathError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="config.json"):
        load_model(tmp_path / "empty")


def test_fingerprint_changes_with_one_byte(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_bytes(b'{"prompt": "p", "response": "r"}\n')
    (d / "b.jsonl").write_bytes(b'{"prompt": "q", "response": "s"}\n')
    f0 = fingerprint(d)
    assert fingerprint(d) == f0
    (d / "b.jsonl").write_bytes(b'{"prompt": "q", "response": "t"}\n')
    assert fingerprint(d) != f0
    assert fingerprint(d, options={"x": 1}) != fingerprint(d)


def test_output_dir_is_atomic_and_resumable(tmp_path):
    out = OutputDir(tmp_path / "job")
    work = out.open()
    (work / "part").write_text("1")
    assert not (tmp_path / "job").exists()           # nothing visible before commit
    out.release()                                    # the first run ends (crash: its lock goes)
    again = OutputDir(tmp_path / "job")
    assert again.resuming                            # a re-run sees the finished parts
    again.open()
    final = again.commit()
    assert (final / "_SUCCESS").exists() and (final / "part").read_text() == "1"
    assert not (tmp_path / "job.partial").exists()
    with pytest.raises(OutputExists):
        OutputDir(tmp_path / "job").open()
    ow = OutputDir(tmp_path / "job", overwrite=True)
    (ow.open() / "new").write_text("2")
    ow.commit()
    assert (tmp_path / "job" / "new").exists() and not (tmp_path / "job" / "part").exists()

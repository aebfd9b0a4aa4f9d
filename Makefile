# Every target works on a fresh clone: each one runs `setup` first, which is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := data/default
SEQ_LEN := 128
# pip extras of the editable install: the tests need `eval` too (lm-eval-harness, for its parity test).
EXTRAS ?= dev,eval

.PHONY: setup data pretrain finetune finetune-lora sample train test test-fast test-extended bench docs lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

data: setup $(DATA)/manifest.json

# Rebuilt when the builder changes (e.g. a new stream), so an old data/ never goes stale silently.
$(DATA)/manifest.json: data_prep/build_default_corpus.py
	$(PY) data_prep/build_default_corpus.py --out $(DATA) --max-seq-len $(SEQ_LEN) --overwrite

# The main job, on CPU: build the corpus -> pretrain a tiny DBRX (16 experts, top-4) with a
# prose -> code curriculum (~5 min) -> fine-tune it on the chat set (~1-2 min) -> ask it a question.
train: pretrain finetune sample

# dbrx_train.launch is Composer's launcher with Ctrl-C answered cleanly (a checkpoint, exit 130).
pretrain: data
	$(PY) -m dbrx_train.launch -n 1 train.py yamls/pretrain/dbrx-tiny.yaml

finetune: data
	$(PY) -m dbrx_train.launch -n 1 train.py yamls/finetune.yaml

# The same fine-tune with LoRA adapters (a frozen base, ~1.5% of the parameters trained): the pretrained
# model's newest checkpoint as an HF folder is the base (runs/dbrx-tiny-hf); writes runs/dbrx-tiny-lora.
finetune-lora: data
	$(PY) scripts/convert_to_hf.py runs/dbrx-tiny runs/dbrx-tiny-hf --dtype fp32 --no-tokenizer
	$(VENV)/bin/composer -n 1 train.py yamls/finetune-lora.yaml

# Greedy answer of the fine-tuned model (runs/dbrx-tiny-chat) to one chat prompt.
sample: setup
	$(PY) scripts/generate.py --model runs/dbrx-tiny-chat --chat --no-system-prompt \
		--max-new-tokens 24 --prompt 'Explain the "for" statement in Python.'

# Test processes: pytest-xdist workers, one test file per worker at a time (a file's module-scoped runs
# are shared by its tests). Most of a test's time is one-core work (imports, process start-up), so two
# workers on a 2-core machine finish sooner; `make test TEST_WORKERS=0` runs in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# The longest runs (pyproject's `extended` marker says which) stay out of `make test` for CI's time.
test: setup
	$(PY) -m pytest -q $(XDIST) -m "not extended" --durations=25

test-fast: setup
	$(PY) -m pytest -q $(XDIST) -m "not slow"

test-extended: setup
	$(PY) -m pytest -q $(XDIST) -m extended

# CPU benchmarks against peers measured in the same run + the 132B cluster estimate (docs/performance.md).
bench: setup
	$(PY) scripts/bench/run.py

# docs/config.md from the config dataclasses' field comments (tests/test_config_docs.py checks it).
docs: setup
	$(PY) scripts/gen_config_docs.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache

# Every target works on a fresh clone: each one runs `setup` first, which is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA := data/default
SEQ_LEN := 128

.PHONY: setup data train test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: setup $(DATA)/manifest.json

$(DATA)/manifest.json:
	$(PY) data_prep/build_default_corpus.py --out $(DATA) --max-seq-len $(SEQ_LEN) --overwrite

# The main job: tiny DBRX (16 experts, top-4) pretrained on the embedded corpus, on CPU.
train: data
	$(VENV)/bin/composer -n 1 train.py yamls/pretrain/dbrx-tiny.yaml

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache

# The two commands a newcomer runs: `make serve` and `make test`. Each sets up its own venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zeda-installed

.PHONY: serve test lint teacher

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the HTTP server lands, `make serve` runs the loop that exists: convert the committed
# tiny teacher and measure the routing and expert-FLOP savings of the result.
DEMO := build/demo
serve: $(STAMP)
	$(VENV)/bin/zeda convert --model models/tiny-teacher --zero-experts 4 --init gaussian --out $(DEMO)/zeda --overwrite
	$(VENV)/bin/zeda inspect --model $(DEMO)/zeda

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Rebuild the committed tiny teacher from scratch (data, tokenizer, pretraining; ~25 min on 2 cores).
teacher: $(STAMP)
	rm -rf build/runs/tiny-teacher
	$(VENV)/bin/zeda data build --out build/data --seed 0 --overwrite
	$(VENV)/bin/zeda train teacher --config trainer/configs/tiny-teacher.yaml
	$(VENV)/bin/zeda eval --model models/tiny-teacher --data build/data

# The two commands a newcomer runs: `make serve` and `make test`. Each sets up its own venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.zeda-installed
# Extras installed with the project; CI adds `sglang` (11 GB) so the SGLang plugin tests run there.
EXTRAS ?= dev

.PHONY: serve test lint teacher zeda

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The main job: the OpenAI-compatible server on the committed tiny ZEDA model, on CPU, offline.
# Open http://127.0.0.1:8000/dashboard for the live savings. Settings: `zeda serve --help`.
serve: $(STAMP)
	$(VENV)/bin/zeda serve

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

# Rebuild the committed tiny ZEDA model from the committed teacher: SFT, then OPD, then eval.
zeda: $(STAMP)
	$(VENV)/bin/zeda data build --out build/data --seed 0 --overwrite
	$(VENV)/bin/zeda train sft --config trainer/configs/tiny-sft.yaml
	$(VENV)/bin/zeda train opd --config trainer/configs/tiny-opd.yaml
	$(VENV)/bin/zeda eval --model build/models/tiny-zeda --data build/data  # promote: cp -r build/models/tiny-zeda models/

# Build the CPU image on a local Debian base and run it for real (docker run, drain, config errors, compose, A/B);
# as root: it installs docker.io, debootstrap and docker-compose if missing. See docker/smoke.sh.
.PHONY: docker-smoke
docker-smoke: $(STAMP)
	VENV=$(VENV) docker/smoke.sh

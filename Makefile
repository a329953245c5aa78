# make run  : install everything and start DPR Lens on the offline pair (http://localhost:8501)
# make test : install everything (chromium for the browser tests too) and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench browser train mini-paper clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

run: setup
	$(PY) -m streamlit run app.py --server.port $(PORT)

browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m bench

# Re-make the offline twin (about 2 h of a 2-core CPU): an undistilled and a distilled twin, their equal-weight
# soup, and its prebuilt index.
TWIN_TRAIN := MALLOC_MMAP_THRESHOLD_=10000000000 MALLOC_TRIM_THRESHOLD_=10000000000 \
	$(PY) -m core train --base minilm: --max-steps 360 --query-styles description question ict --no-eval
train: setup
	$(TWIN_TRAIN) --output build/twin-free
	$(TWIN_TRAIN) --output build/twin-distilled --distill-weight 1.0
	$(PY) -m core soup --twins build/twin-free build/twin-distilled --output assets/minilm-wiki-dpr \
		--compare build/twin-free build/twin-distilled
	$(PY) -m core build-index --pair offline --prebuilt

# Re-make the mini-paper pair: MLM pre-training of a 4-layer BERT, then DPR training of a copy (about 1 h).
mini-paper: setup
	$(PY) -m core pretrain --output assets/mini-bert-wiki
	$(PY) -m core train --base assets/mini-bert-wiki --output assets/mini-bert-wiki-dpr --epochs 2 --lr 1e-4

clean-cache:
	rm -rf $${DPR_LENS_CACHE:-$$HOME/.cache/dpr-lens}

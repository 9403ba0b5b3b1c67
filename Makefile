# make demo  — set up .venv if missing, then run the main job on a generated demo slide with the demo model
# make test  — set up, then run the whole test suite (TEST_WORKERS processes, default one per core up to 4)
# make lint  — ruff, and the layering contract (import-linter, pyproject.toml [tool.importlinter])
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR := outputs/demo
# test processes (pytest-xdist): one per core, at most 4 (each imports torch; most tests start interpreters)
TEST_WORKERS ?= $(shell python3 -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/wsiseg-synth $(DEMO_DIR)/demo_slide.tif --width 8192 --height 6144 --seed 101 --skip-existing
	$(VENV)/bin/wsiseg-predict model=demo data.slides=$(DEMO_DIR)/demo_slide.tif data.patch_size=256 data.overlap=32 \
		writer.output_downsample=4 hydra.run.dir=$(DEMO_DIR)/run
	@echo "demo outputs: $(DEMO_DIR)/run/demo_slide/{mask.tif,heatmap.png,report.json}"

test: setup
	$(VENV)/bin/lint-imports --no-cache
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf $(VENV) outputs .pytest_cache

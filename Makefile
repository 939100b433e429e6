# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR := outputs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: install demo test test-all clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the paper-table study at the smoke preset on the built-in dataset
# (3 backbones x {none, crfrnn, pointrend} with matched none baselines, densecrf with default and
# validation-tuned parameters on the none runs; plan in experiments/paper_table/README.md), ending with the table.
demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/python experiments/paper_table/run.py --preset smoke --out $(DEMO_DIR)

# The default suite (slow tests deselected); `make test-all` runs everything.
test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache

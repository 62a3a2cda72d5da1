# The two commands of the README, the newest-release check, and the style helpers.
PYTHON ?= python
# The exact versions CI tested (torch / torchvision pair included). `make install CONSTRAINTS=` installs the newest
# releases pyproject.toml allows instead, into the current environment.
CONSTRAINTS ?= constraints.txt
PIN = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# The separate environment of `make test-latest` (created by it; `make pin` reads it).
LATEST_VENV ?= .venv-latest

.PHONY: install demo test test-latest pin style

# torch and torchvision are installed first, as the matched pair of the constraints file, when torchvision's ops
# cannot be loaded (the detector needs them; a torchvision beside another torch fails to import them).
install:
	$(PYTHON) -c "import torchvision.ops" 2>/dev/null || $(PYTHON) -m pip install -q $(PIN) torch torchvision
	$(PYTHON) -m pip install -q $(PIN) -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 accelerate launch --num_processes 1 examples/run_pretrain.py

# transformers' common model tests (tests/test_modeling_common_suite.py) ship in its sdist only: fetched once per
# installed version and cached (see .ci/fetch_transformers_sdist.py), unless TRANSFORMERS_SDIST_DIR is already set.
test: install
	sdist="$${TRANSFORMERS_SDIST_DIR:-$$($(PYTHON) .ci/fetch_transformers_sdist.py)}" && \
	HF_HUB_OFFLINE=1 TRANSFORMERS_SDIST_DIR="$$sdist" $(PYTHON) -m pytest -q

# The suite on the newest releases pyproject.toml allows, in $(LATEST_VENV) (made on first use, upgraded after),
# leaving the current environment alone. Prints which installed versions differ from constraints.txt; common tests
# that release skips and tests/test_modeling_common_suite.py does not list are reported as "NOT REVIEWED".
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable > $(LATEST_VENV)/tested-versions.txt
	@echo "Installed versions that differ from constraints.txt (< pinned, > installed):"
	@grep -v '^#' constraints.txt | diff - $(LATEST_VENV)/tested-versions.txt | grep '^[<>]' || echo "  none"
	sdist="$$($(LATEST_VENV)/bin/python .ci/fetch_transformers_sdist.py)" && \
	HF_HUB_OFFLINE=1 TRANSFORMERS_SDIST_DIR="$$sdist" $(LATEST_VENV)/bin/python -m pytest -q

# After a green `make test-latest`: pin what it tested (rewrites constraints.txt, keeping its header comment).
pin:
	test -f $(LATEST_VENV)/tested-versions.txt || { echo "run make test-latest first"; exit 2; }
	{ grep '^#' constraints.txt; cat $(LATEST_VENV)/tested-versions.txt; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

style:
	ruff check --fix modeling_imagebert examples tests benchmarks metrics tools
	ruff format modeling_imagebert examples tests benchmarks metrics tools

# The two commands of the README, and the style helpers.
PYTHON ?= python

.PHONY: install demo test style

install:
	$(PYTHON) -c "import torchvision.ops" 2>/dev/null || $(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 accelerate launch --num_processes 1 examples/run_pretrain.py

# transformers' common model tests (tests/test_modeling_common_suite.py) ship in its sdist only: fetched once per
# installed version and cached (see .ci/fetch_transformers_sdist.py), unless TRANSFORMERS_SDIST_DIR is already set.
test: install
	sdist="$${TRANSFORMERS_SDIST_DIR:-$$($(PYTHON) .ci/fetch_transformers_sdist.py)}" && \
	HF_HUB_OFFLINE=1 TRANSFORMERS_SDIST_DIR="$$sdist" $(PYTHON) -m pytest -q

style:
	ruff check --fix modeling_imagebert examples tests benchmarks metrics tools
	ruff format modeling_imagebert examples tests benchmarks metrics tools

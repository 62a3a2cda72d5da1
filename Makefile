# The two commands of the README, and the style helpers.
PYTHON ?= python

.PHONY: install demo test style

install:
	$(PYTHON) -c "import torchvision.ops" 2>/dev/null || $(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install
	HF_HUB_OFFLINE=1 accelerate launch --num_processes 1 examples/run_pretrain.py

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

style:
	ruff check --fix modeling_imagebert examples tests benchmarks metrics
	ruff format modeling_imagebert examples tests benchmarks metrics

# Two commands for a newcomer: `make demo` and `make test`. Both create the
# virtual environment on first use and install the pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: venv demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,webui]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) train_dreambooth.py --config configs/demo.yaml

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m bench.adapter_overhead

clean:
	rm -rf outputs .pytest_cache

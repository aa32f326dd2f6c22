# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install what they need (torch 2.13.0 CPU build first, so pip never pulls a CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo
METHOD ?= lcd

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test,plot,data]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/stepdistill demo --out $(OUT) --method $(METHOD)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) out

# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install what they need (torch 2.13.0 CPU build first, so pip never pulls a CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= out/demo
METHOD ?= lcd

.PHONY: install demo test bench clean

# pip byte-compiles every installed file on one core; compileall does the same on every core (a clean install on
# 2 cores: 70 s -> 43 s). Files written for newer Pythons (torch's py312 test helpers) do not compile, as under
# pip, so its status is not checked.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[test,plot,data]'
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null 2>&1 || true
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/stepdistill demo --out $(OUT) --method $(METHOD)

# Two worker processes (pytest-xdist), a module to a worker, the slow modules first (tests/conftest.py), one torch
# thread each: on 2 cores a second thread speeds these small models up ~1.15x, a second process ~1.5x (a slow 2-core
# machine: 29:24 -> 17:21 of pytest; 20:28 with xdist's own module order, which left the demo module for last).
# `pytest tests/...` without -n runs in one process, two threads.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadscope --no-loadscope-reorder

clean:
	rm -rf $(VENV) out

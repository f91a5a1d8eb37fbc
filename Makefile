# `make demo` trains the demo model, `make test` runs the tests; each makes or reuses .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.run

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf .ct3d runs

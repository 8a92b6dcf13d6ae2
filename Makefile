# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test venv bench clean

venv: $(STAMP)

# Re-installs only when a requirements file changes; otherwise instant. The demo needs only
# requirements.txt; the tests and benchmarks add the references (torch, transformers).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Both files in one pip call, so that the resolver keeps the runtime pins while adding the
# test pins (nothing already installed is installed again).
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $(TEST_STAMP)

# Trains the embedded shapes default in runs/shapes, evaluates it, then draws predictions and
# sampling-point pictures for a few validation images.
demo: $(STAMP)
	$(PY) train.py --workdir runs/shapes
	$(PY) eval.py --config configs/shapes.py --checkpoint runs/shapes/checkpoints \
	    --workdir runs/shapes --predict_val 4 --out runs/shapes/predictions

# Two pytest-xdist workers, one test file each at a time (module fixtures computed once): most of
# a test is single-threaded XLA compilation, so on the 2-core CI machine this takes the suite
# from 24.6 to 14.3 min. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: $(TEST_STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

bench: $(TEST_STAMP)
	$(PY) benchmarks/msda.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/model.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval.py

clean:
	rm -rf $(VENV) runs

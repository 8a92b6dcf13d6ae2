# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

venv: $(STAMP)

# Re-installs only when a requirements file changes; otherwise instant.
$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

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
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

bench: $(STAMP)
	$(PY) benchmarks/msda.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/model.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval.py

clean:
	rm -rf $(VENV) runs

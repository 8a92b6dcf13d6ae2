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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/msda.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/model.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/eval.py

clean:
	rm -rf $(VENV) runs

# `make test` and `make demo` work on a fresh clone: each creates .venv and installs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO ?= demo
PYTEST_ARGS ?=
# On a shared 2-core machine OpenMP's busy-waiting threads made training steps 10x slower.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: test install-check demo lint format bench clean gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

# pytest exits 5 when it collects no tests: say so instead of failing on an empty selection.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# A plain `pip install .` (not editable) into a fresh venv must leave every `python -m`
# command the README documents working from any directory: each one's --help is run from
# an empty temporary directory. The sources are copied first so that a stale build/ here
# cannot leak into the wheel. With a warm pip cache it takes about 100 s on 2 CPU cores.
install-check:
	@set -eu; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	modules=$$(grep -o 'python -m [a-z_]*\.[a-z_.]*' README.md | cut -d' ' -f3 | sort -u); \
	[ -n "$$modules" ] || { echo "install-check: no python -m commands in README.md"; exit 1; }; \
	mkdir "$$tmp/src" "$$tmp/cwd"; \
	git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$$tmp/src"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --disable-pip-version-check --no-compile "$$tmp/src" \
		>"$$tmp/pip.log" 2>&1 || { tail -n 20 "$$tmp/pip.log"; exit 1; }; \
	cd "$$tmp/cwd"; failed=0; \
	for module in $$modules; do \
		if env -u PYTHONPATH "$$tmp/venv/bin/python" -m $$module --help >/dev/null 2>"$$tmp/err"; \
		then echo "install-check: ok   python -m $$module --help"; \
		else echo "install-check: FAIL python -m $$module --help:"; tail -n 3 "$$tmp/err"; \
			failed=1; fi; \
	done; exit $$failed

# The whole job on a small generated dataset: zips -> shards -> train -> evaluate. The demo
# trains a slimmer UNet with the default recipe for 10 epochs so it finishes in minutes on 2
# CPU cores (benchmarks/RESULTS.md, "make demo", has the measured IoU and wall time).
demo: $(STAMP)
	$(PY) -m sharding.synth --out $(DEMO)/zips --batches 2 --backgrounds 20 --foregrounds 8 \
		--placements 4 --seed 0 --overwrite
	$(PY) -m sharding.build $(DEMO)/zips/batch*_images.zip --out $(DEMO)/shards --overwrite
	$(PY) -m sharding.verify $(DEMO)/shards
	$(PY) train.py --data $(DEMO)/shards --out $(DEMO)/run --overwrite --epochs 10 \
		--batch-size 16 --widths 8,16,32,64 --no-augment

# Every GPU path on a machine with one CUDA GPU, in about 5 minutes (benchmarks/gpu_check.py).
# It uses a Python as it is, with no venv made, no install, no network: the PYTHON given on the
# command line or in the environment (PYTHON=python3 make gpu-check), else $(VENV)/bin/python
# when it exists (README's GPU set-up makes it), else python3. Without torch, CUDA or DALI it
# stops at once with one line naming what is missing.
GPU_PYTHON = $(if $(filter file,$(origin PYTHON)),$(if $(wildcard $(PY)),$(PY),$(PYTHON)),$(PYTHON))
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT) --overwrite $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache

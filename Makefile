# Two entry points: `make studies` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MUJOCO_GL ?= egl
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install system-deps studies test bench notebooks explorer lab screenshots demos train-micro eval-micro clean

install: $(STAMP)

# Debian's chromium: plotly's static export (kaleido) and the explorer's browser test drive it.
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "dcvla needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

$(STAMP): pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,libero,cluster]"
	touch $(STAMP)

studies: $(STAMP)
	$(PY) -m dcvla studies

# one pytest worker per core, at most 4 (each test file on one worker: its fixtures are built once)
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile

# the micro policies' demonstrations (50 per task, about 2 h on 2 cores) and training (resumable: rerun to go on)
demos: $(STAMP)
	$(PY) scripts/record_demos.py

train-micro: $(STAMP)
	$(PY) scripts/train_micro.py openvla-micro
	$(PY) scripts/train_micro.py oft-micro
	$(PY) scripts/train_micro.py smolvla-micro

eval-micro: $(STAMP)
	$(PY) scripts/eval_micro.py smolvla-micro

bench: $(STAMP)
	$(PY) benchmarks/step_latency.py --preset tiny --preset small

# notebooks/*.ipynb (git-ignored) from their jupytext sources notebooks/*.py; `dcvla run` builds its own
notebooks: $(STAMP)
	$(PY) -m dcvla.notebooks

# JupyterLab on notebooks/ with the project's kernel ("dcvla (.venv)", registered inside .venv, not per user)
lab: notebooks
	$(PY) -m ipykernel install --sys-prefix --name dcvla --display-name "dcvla (.venv)" >/dev/null
	$(PY) -m jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

# the README's browser screenshots (figures/explorer.png, figures/jupyterlab.png), from the browser tests; `make test` leaves them alone
screenshots: $(STAMP)
	DCVLA_SCREENSHOTS=figures $(PY) -m pytest -q tests/test_explorer.py tests/test_lab.py -k "in_voila or in_jupyterlab"

explorer: notebooks
	$(PY) -m voila notebooks/explorer.ipynb --no-browser --Voila.ip=127.0.0.1 \
	  --VoilaConfiguration.extension_denylist=jupyterlab-jupytext

clean:
	rm -rf $(VENV) build *.egg-info

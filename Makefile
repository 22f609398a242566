# The two commands of the README:
#   make run    installs everything (system tools, .venv) and starts a node
#   make test   installs everything and runs the whole test suite
# Python: the newest 3.13 / 3.12 / 3.11 found, on PATH or in the usual install places
# (pyenv, /usr/local, /opt); 3.11+ is required, 3.13 for private networks (ssl PSK callbacks).
PY_CANDIDATES := $(foreach v,3.13 3.12 3.11,python$(v) \
	$(wildcard $(HOME)/.pyenv/versions/$(v)*/bin/python$(v) /root/.pyenv/versions/$(v)*/bin/python$(v) \
	/usr/local/bin/python$(v) /opt/python*/bin/python$(v) /opt/*/bin/python$(v))) python3
PYTHON ?= $(shell for p in $(PY_CANDIDATES); do \
	if $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; \
	then echo $$p; break; fi; done)
VENV := .venv
STAMP := $(VENV)/.installed-$(notdir $(PYTHON))
# command:debian-package pairs the project needs on the machine
SYSTEM_TOOLS := cc:gcc ip:iproute2 ping:iputils-ping iperf3:iperf3 curl:curl chromium:chromium chromedriver:chromium-driver dig:dnsutils
ARGS ?= --no-tun

.PHONY: run test install system-deps lint bench fuzz clean native asan
# the C data-plane kernel (common/_kernel.c; optional: without it the Python reference runs)
KERNEL_STAMP := $(VENV)/.kernel-built
ASAN_SO := build/asan/_kernel.so

run: install
	$(VENV)/bin/mycelium $(ARGS)

test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

install: system-deps $(STAMP) $(KERNEL_STAMP)

native: $(KERNEL_STAMP)

$(KERNEL_STAMP): $(STAMP) common/_kernel.c setup.py
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	@$(VENV)/bin/python -c 'from common import native; print(native.describe())'
	@touch $@

# the kernel's property and bad-input tests with an AddressSanitizer build of it
asan: install
	@mkdir -p $(dir $(ASAN_SO))
	cc -O1 -g -fsanitize=address -fno-omit-frame-pointer -fPIC -shared \
		-I$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])') \
		common/_kernel.c -lcrypto -o $(ASAN_SO)
	# PYTHONMALLOC=malloc: every Python buffer gets ASan's red zones (pymalloc arenas have none)
	export LD_PRELOAD=$$(cc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		PYTHONMALLOC=malloc MYCELIUM_KERNEL_SO=$(ASAN_SO); \
	$(VENV)/bin/python -c 'from common import native; print(native.describe())' && \
	$(VENV)/bin/python -m pytest -q -s -p no:cacheprovider tests/unit/test_native_kernel.py tests/unit/test_native_io.py tests/unit/test_datapath.py tests/unit/test_native_sessions.py tests/unit/test_sessions.py tests/unit/test_tund_dataplane.py tests/unit/test_peerd_links.py tests/unit/test_tund_wait.py  # -s: an ASan report kills the process, so it must not be captured

$(STAMP): setup.cfg pyproject.toml setup.py
	@test -n "$(PYTHON)" || { echo "error: Python 3.11 or newer is required (install python3 >= 3.11)"; exit 1; }
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || $(MAKE) --no-print-directory APT_PACKAGES=python3-venv apt-install
	$(PYTHON) -m venv --clear $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $@

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	test -f /usr/include/openssl/evp.h || missing="$$missing libssl-dev"; \
	if [ -n "$$missing" ]; then $(MAKE) --no-print-directory APT_PACKAGES="$$missing" apt-install; fi

apt-install:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing system packages:$(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	else \
		echo "warning: missing system packages:$(APT_PACKAGES); install them with: sudo apt-get install$(APT_PACKAGES)"; \
	fi

# ruff, the import contract (imports point down, no cycles) and mypy on common/ and services/
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_import_contract.py
	$(VENV)/bin/mypy

# coverage-guided fuzzing of every decoder, both engines' input and apid's JSON handlers
# (fuzz/targets.py): 10^6 inputs, 10 s per input at most, 2 GB at most; findings in fuzz/artifacts/
FUZZ_RUNS ?= 1000000
fuzz: install
	$(VENV)/bin/python fuzz/run.py --seeds fuzz/corpus
	mkdir -p fuzz/artifacts
	$(VENV)/bin/python fuzz/run.py -runs=$(FUZZ_RUNS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix=fuzz/artifacts/ fuzz/corpus

# what production runs: the data path between namespaces (short mode; needs root, iperf3,
# Yggdrasil as the baseline if installed), then the codec functions and the shared wire rules
BENCH_SECONDS ?= 3
bench: install
	$(VENV)/bin/python bench/bench_dataplane.py --seconds $(BENCH_SECONDS) --no-failover
	$(VENV)/bin/python bench/bench_codec.py --seconds 1
	$(VENV)/bin/python bench/bench_rules.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

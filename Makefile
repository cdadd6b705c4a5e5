# qcowfs developer entry points. Every target is safe to run twice.
#   make test   install what is missing (apt + .venv), lint, check layering, run the suite
#   make demo   mount a sample chain, show it off, unmount
#   make bench  fio through qcowfs beside qemu-storage-daemon (see docs/performance.md)
#   make bench-engine  the library's reads and writes against os.pread/os.pwrite
#   make bench-cli  every offline command beside qemu-img on the same files (docs/performance.md)
#   make fuzz   mutate QEMU-made images for FUZZ_SECONDS (FUZZ_SEED=) through every command
#   make crash  CRASH_RUNS SIGKILL runs over the writing operations, judged by qemu-img check

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
APT_PACKAGES := fuse3 libfuse3-dev pkg-config qemu-utils e2fsprogs util-linux gcc systemd patch \
                qemu-system-x86 busybox-static \
                python3-dev python3-venv
BENCH_APT_PACKAGES := fio qemu-system-common
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60
FUZZ_SEED ?= 1
CRASH_RUNS ?= 200
CRASH_SEED ?= 1

.PHONY: all test lint system-deps bench-deps venv demo bench bench-engine bench-cli fuzz crash \
        clean install-helper

all: test

system-deps:
	@./.ci/apt-ensure $(APT_PACKAGES)

bench-deps:
	@./.ci/apt-ensure $(BENCH_APT_PACKAGES)

$(VENV)/.stamp: pyproject.toml $(wildcard packaging/pyfuse3-*.patch)
	@$(MAKE) --no-print-directory system-deps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(VPY) packaging/install-pyfuse3
	@touch $@

# A compat-mode editable install is one path line in a .pth file; the default mode installs an
# import hook whose own imports (pathlib, importlib.util, ...) cost every qcowfs start about
# 20 ms. Venvs made before this rule get reinstalled once, without their dependencies.
# It also builds the optional C sector loop in place (setup.py), again when its source changes.
$(VENV)/.editable-compat: $(VENV)/.stamp setup.py qcowfs/image/_sectors.c
	$(VPY) -m pip install -q --no-deps -e . --config-settings editable_mode=compat
	@touch $@

venv: $(VENV)/.stamp $(VENV)/.editable-compat

lint: venv
	$(VENV)/bin/ruff check qcowfs tests fuzz $(wildcard bench)
	$(VENV)/bin/lint-imports

test: system-deps venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: system-deps venv
	$(VPY) -m qcowfs.demo

bench: system-deps bench-deps venv
	$(VPY) bench/bench_fuse.py

bench-cli: system-deps venv
	$(VPY) bench/bench_cli.py

bench-engine: system-deps venv
	$(VPY) bench/bench_read.py
	$(VPY) bench/bench_write.py

fuzz: system-deps venv
	PYTHONPATH=. $(VPY) -m fuzz.campaign --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

crash: system-deps venv
	PYTHONPATH=. $(VPY) -m fuzz.crash --runs $(CRASH_RUNS) --seed $(CRASH_SEED)

# mount(8) finds helpers only in /sbin: `mount -t fuse.qcowfs` and fstab lines need this link.
install-helper: venv
	ln -sfn $(abspath $(VENV))/bin/mount.fuse.qcowfs /usr/sbin/mount.fuse.qcowfs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	rm -f qcowfs/image/_sectors*.so

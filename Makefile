# The README's commands. `make demo` installs what is needed, builds, and runs the main job
# on a single machine; `make test` installs, builds (release and sanitizer trees) and runs
# every test.
JOBS ?= $(shell nproc)
BUILD ?= build/release
ASAN_BUILD ?= build/asan
PREFIX ?= /usr/local

.PHONY: all deps build build-asan demo bench install test test-release test-asan clean

all: build

deps:
	@scripts/install-deps

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

# clang, so that the libFuzzer targets can be built beside the ASan/UBSan build.
build-asan: deps
	@CC=clang cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCKPT_SANITIZE=ON -DCKPT_FUZZ=ON -DCKPT_CUDA=OFF >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS)

# libckpt.so, its headers, ckpt.pc and the tools under $(PREFIX); DESTDIR stages a package.
install: build
	@DESTDIR=$(DESTDIR) cmake --install $(BUILD) --prefix $(PREFIX)

demo: build
	@scripts/demo $(BUILD)

# ckpt-engine beside save-and-reload, torch.distributed and hand-written MPI on the same
# checkpoint in one run: table, $(BENCH_OUT)/peers.json and the plots (docs/BENCH.md).
# BENCH_ARGS=--quick, --full, --dir MODEL.
BENCH_OUT ?= $(BUILD)/bench-out
bench: build
	@CKPT_BUILD_DIR=$(BUILD) scripts/bench --out $(BENCH_OUT) $(BENCH_ARGS)

test: test-release test-asan

test-release: build
	@cd $(BUILD) && ctest --output-on-failure -j 2

# The sanitizer tree has no `python` case (ctypes cannot load an ASan libckpt.so); its
# `python-mpi` case runs the multi-process tests against the ASan/UBSan binaries.
test-asan: build-asan
	@cd $(ASAN_BUILD) && ctest --output-on-failure -j 2

clean:
	rm -rf build

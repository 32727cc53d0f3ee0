# edge-replicator. `make help` lists the targets.
CARGO ?= cargo
CONFIG ?= config/edge-replicator.toml
DATA_DIR ?= data

.PHONY: help build release run test test-deps fmt clippy unit clean
.PHONY: cross test-cross deb deb-test systemd-verify

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

build: ## debug build
	$(CARGO) build

release: ## optimised build (target/release/edge-replicator)
	$(CARGO) build --release

run: release ## run with the shipped config, state in ./data
	mkdir -p $(DATA_DIR)
	./target/release/edge-replicator run --config $(CONFIG) --data-dir $(DATA_DIR)

test-deps: ## install what the tests need (Debian packages, Python and npm clients)
	./scripts/install-test-deps.sh

fmt: ## format the code
	$(CARGO) fmt

clippy: ## lint, warnings are errors
	$(CARGO) clippy --all-targets -- -D warnings

unit: ## unit and property tests only (no external programs)
	$(CARGO) test --lib

test: test-deps ## everything CI runs: fmt check, clippy, all tests
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --all-targets

clean:
	$(CARGO) clean

# Raspberry Pi builds and the .deb (README.md, "Raspberry Pi / .deb").
# TARGET is a Rust target triple for cross and test-cross (both Pi targets when
# unset), a Debian architecture for deb (amd64 when unset; arm64, armhf).
# Without Docker, scripts/cross-setup.sh installs Debian's cross toolchain.
PI_TARGETS := aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf

cross: ## release build for TARGET (default: both Pi targets)
	./scripts/cross.sh build $(or $(TARGET),$(PI_TARGETS))

test-cross: test-deps ## test suite for TARGET under qemu (default: both Pi targets)
	./scripts/cross.sh test $(or $(TARGET),$(PI_TARGETS))

deb: ## .deb for TARGET=amd64|arm64|armhf (default amd64), in target/debian
	./scripts/deb.sh $(or $(TARGET),amd64)

deb-test: ## install, upgrade, remove and purge the amd64 .deb (root)
	./scripts/deb-test.sh

systemd-verify: ## systemd-analyze verify and offline security score of the unit
	./scripts/systemd-verify.sh

# Benchmarks: not part of `make test` (timed results are not assertions).
.PHONY: bench
bench: ## edge-replicator vs vmagent and the hardware limits (BENCH_QUICK=1: smoke test); results in target/bench/
	./scripts/install-bench-deps.sh
	$(CARGO) build --release
	$(CARGO) bench --bench bench
	$(CARGO) bench --bench lineproto

# Where ingest time goes: the agent built with its symbols (the release
# profile strips them) under perf, one flame graph per mix in target/bench/.
.PHONY: profile
profile: ## perf profile of ingest per mix: target/bench/flame-<mix>.svg and the share of each stage
	./scripts/install-bench-deps.sh
	command -v inferno-flamegraph >/dev/null || $(CARGO) install --locked inferno
	CARGO_PROFILE_RELEASE_STRIP=none CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
		$(CARGO) build --release --target-dir target/profile
	BENCH_AGENT=target/profile/release/edge-replicator BENCH_ONLY=profile $(CARGO) bench --bench bench

# A fleet of agents through an outage of their one remote (README.md,
# "Running a fleet"); several minutes at the default 200 agents.
.PHONY: fleet-sim
fleet-sim: test-deps release ## FLEET_AGENTS (default 200) agents, remote down FLEET_OUTAGE (120s): reconnect storm figures in target/fleet-sim/
	$(CARGO) bench --bench fleet

# Reliability runs: bounded, but too long for `make test` (which runs the
# crash loop with 50 kills and the property tests on every change).
FUZZ_TIME ?= 60
.PHONY: fuzz soak
fuzz: ## fuzz the line-protocol parser, the gzip body reader and the WAL decoder, FUZZ_TIME seconds each (default 60)
	./scripts/install-fuzz-deps.sh
	FUZZ_RUNS=$(FUZZ_RUNS) ./scripts/fuzz.sh $(FUZZ_TIME)

soak: test-deps ## long runs: CRASH_KILLS (default 1000) SIGKILLs under load, every crash point, SOAK_FUZZ_RUNS (default 10 M) fuzz executions per target
	CRASH_KILLS=$(or $(CRASH_KILLS),1000) CRASH_SEED=$${CRASH_SEED:-$$(date +%s)} \
		$(CARGO) test --test crash -- --nocapture --test-threads=1
	$(MAKE) fuzz FUZZ_RUNS=$(or $(SOAK_FUZZ_RUNS),10000000)

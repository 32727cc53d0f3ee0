# edge-replicator. `make help` lists the targets.
CARGO ?= cargo
CONFIG ?= config/edge-replicator.toml
DATA_DIR ?= data

.PHONY: help build release run test test-deps fmt clippy unit clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

build: ## debug build
	$(CARGO) build

release: ## optimised build (target/release/edge-replicator)
	$(CARGO) build --release

run: release ## run with the shipped config, state in ./data
	mkdir -p $(DATA_DIR)
	./target/release/edge-replicator run --config $(CONFIG) --data-dir $(DATA_DIR)

test-deps: ## install what the tests need (Debian packages, Python client)
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

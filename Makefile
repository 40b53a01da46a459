# The two commands of the quickstart: `make run` and `make test`. Both set up what is missing
# (a private PostgreSQL cluster when DATABASE_URL is unset, a development key, migrations).
SHELL := /bin/bash
CARGO ?= cargo
export TOKENVAULT_LOG_FORMAT ?= pretty

.PHONY: run test lint fmt bench migrate help demo

help:
	@echo "make run    build, set up a local database and key, migrate, then serve (public :8080, internal :8081)"
	@echo "make test   the same set-up, then the whole test suite"
	@echo "make lint   cargo fmt --check and clippy -D warnings"
	@echo "make bench  the benchmark (see docs/PERFORMANCE.md)"
	@echo "make demo   build, then a token from the local Trackunit sandbox with curl, step by step"

run:
	$(CARGO) build --release --locked
	scripts/with-env.sh dev ./target/release/tokenvault migrate
	scripts/with-env.sh dev ./target/release/tokenvault serve

test:
	scripts/with-env.sh test $(CARGO) test --locked --workspace --all-targets

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

demo:
	$(CARGO) build --release --locked
	scripts/with-env.sh dev scripts/demo.sh ./target/release/tokenvault

bench:
	scripts/with-env.sh test bench/run.sh

# chatguard — the two commands a newcomer needs:
#   make run    set everything up and start the server on 127.0.0.1:8686
#   make test   set everything up and run every test
SHELL := /bin/bash
CARGO ?= cargo
LISTEN ?= 127.0.0.1:8686

.PHONY: run test bench soak models build lint fmt clean-models

models:
	bash models/setup.sh

build:
	$(CARGO) build --release

run: models build
	./target/release/chatguard serve --listen $(LISTEN)

# The tests get a throwaway redis-server on 127.0.0.1:6399 (installed with apt-get if missing,
# stopped afterwards even on failure): scripts/with-test-redis.sh sets CHATGUARD_TEST_REDIS_URL.
test: models
	bash scripts/with-test-redis.sh $(CARGO) test --all-features --lib --bins --tests

bench: models
	$(CARGO) bench

# 10 minutes (SOAK_SECS) of the full message mix at 80 % of the measured capacity, models on:
# zero lost/duplicated replies and the server's RSS curve (scripts/soak.sh, examples/loadgen.rs).
soak: models
	bash scripts/soak.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

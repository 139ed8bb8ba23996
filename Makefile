# nodecrypt — everything a newcomer needs is `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all deps build test bench demo fmt lint fuzz clean

all: build

deps:
	@scripts/deps.sh

build: deps
	$(CARGO) build --workspace --bins

# Unit tests, then the end-to-end tests that run the real binaries (built first). The
# lifecycle tests also need the agent built with the test-only `failpoints` feature.
test: build lint
	$(CARGO) build -p nodecrypt-agent --features failpoints --bin nodecrypt-agent
	cp target/debug/nodecrypt-agent target/debug/nodecrypt-agent-failpoints
	$(CARGO) build --workspace --bins
	# A hard ceiling: a hung test fails the run instead of eating CI's time limit.
	timeout --kill-after=60 3000 $(CARGO) test --workspace --no-fail-fast

# Benchmarks: XTS engine vs Debian's and the newest OpenSSL (built from source once, in
# benches/openssl-new's own target dir: a few minutes the first time) and xts-mode;
# broker throughput/latency; the userspace data path. See docs/benchmarks.md.
bench: deps
	$(CARGO) build --release --workspace --bins
	$(CARGO) build --release --manifest-path benches/openssl-new/Cargo.toml
	$(CARGO) bench -p nodecrypt-benches

demo: deps
	$(CARGO) build --workspace --bins --release
	scripts/demo.sh

# Coverage-guided fuzzing of the untrusted-header judge (nightly and cargo-fuzz; not part
# of `make test`, whose unit tests run a bounded, seeded fuzz of the same code).
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd agent/fuzz && $(CARGO) +nightly fuzz run header_bytes -- -max_total_time=$(FUZZ_SECONDS)
	cd agent/fuzz && $(CARGO) +nightly fuzz run header_json -- -max_total_time=$(FUZZ_SECONDS)

fmt:
	$(CARGO) fmt --all

# Lints are part of the test command: clippy with warnings as errors over every target,
# and formatting.
lint: deps
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all -- --check

clean:
	$(CARGO) clean

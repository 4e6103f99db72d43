# Convenience targets; CI runs .ci/run.
.PHONY: run test crash-loop bench bench-smoke fuzz lint

run:
	cargo run --release -- run

test:
	cargo test --release

# The crash-loop test with 50 rounds of concurrent ingest + SIGKILL + restart.
crash-loop:
	LLMLOGD_CRASH_ROUNDS=50 cargo test --release --test tests reliability::crash_loop -- --nocapture

# A longer fuzz run of every parser (proptest).
fuzz:
	PROPTEST_CASES=200000 cargo test --release --lib fuzz

bench:
	cargo run --release --bin llmlogd-bench

bench-smoke:
	cargo run --release --bin llmlogd-bench -- --smoke

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

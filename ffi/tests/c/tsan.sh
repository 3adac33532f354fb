#!/usr/bin/env bash
# Runs the C threads test (threads sharing one batch and one proxy) under ThreadSanitizer: the
# library and its std are built with -Zsanitizer=thread (nightly, std rebuilt from rust-src),
# the C test with cc -fsanitize=thread, both linked with the toolchain's
# ThreadSanitizer runtime; any data race fails it. Output under
# target/tsan. Needs a nightly toolchain with rust-src, and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/../../.."
target="$(rustc -vV | awk '$1 == "host:" { print $2 }')"
RUSTFLAGS="-Zsanitizer=thread" cargo +nightly build -Zbuild-std --target "$target" \
    --target-dir target/tsan -p svcproxy-ffi --lib --locked
# The runtime is the toolchain's own (the one rustc links into sanitized Rust programs): the
# C compiler's may be older than the instrumentation rustc emits.
runtime="$(rustc +nightly --print sysroot)/lib/rustlib/$target/lib/librustc-nightly_rt.tsan.a"
cc -std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -g -fsanitize=thread -c \
    -Iffi/include ffi/tests/c/threads_test.c -o target/tsan/threads_test.o
cc target/tsan/threads_test.o "target/tsan/$target/debug/libsvcproxy_ffi.a" \
    -Wl,--whole-archive "$runtime" -Wl,--no-whole-archive \
    -lpthread -ldl -lm -lstdc++ -o target/tsan/threads_test
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" target/tsan/threads_test

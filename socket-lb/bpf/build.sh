#!/usr/bin/env bash
# Rebuilds socklb.bpf.o from socklb.bpf.c (Debian: clang, libbpf-dev). The object is checked
# in so that building the Rust crates needs no clang; `build.sh --check` fails when it is stale.
set -euo pipefail
cd "$(dirname "$0")"
out=socklb.bpf.o
[ "${1:-}" = --check ] && out=$(mktemp --suffix=.o)
# -mcpu=v3 for atomics with a result, -g for BTF (the map definitions), no debug paths.
clang -O2 -g -target bpf -mcpu=v3 -Wall -Werror \
    -I"/usr/include/$(uname -m)-linux-gnu" -fdebug-prefix-map="$PWD"=. \
    -c socklb.bpf.c -o "$out"
if [ "${1:-}" = --check ]; then
    trap 'rm -f "$out"' EXIT
    cmp -s "$out" socklb.bpf.o || { echo "socket-lb/bpf/socklb.bpf.o is stale: run socket-lb/bpf/build.sh" >&2; exit 1; }
fi

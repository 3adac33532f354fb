#!/usr/bin/env bash
# Usage: ffi/localize.sh IN.a OUT.a (OUT may be IN)
#
# Makes a static library that exports only the C API. A Rust static library holds every object
# of std and the dependencies with their symbols global, so a program that links it beside
# another Rust library (or one with the same C dependency) gets clashing definitions. This
# links the archive's objects into one relocatable object (ld -r), makes every global symbol
# but svcproxy_* local (objcopy), and archives that object alone. The LLVM bitcode that rustc
# embeds is dropped: binutils' LTO plugin cannot read it.
set -euo pipefail
in="$1"
out="$2"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ld -r -o "$work/svcproxy.o" --whole-archive "$in"
objcopy --wildcard --keep-global-symbol='svcproxy_*' \
    --remove-section=.llvmbc --remove-section=.llvmcmd "$work/svcproxy.o"
rm -f "$out"
ar rcs "$out" "$work/svcproxy.o"

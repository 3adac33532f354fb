#!/usr/bin/env bash
# Builds the real servers the API-watch tests run against: kube-apiserver of the Kubernetes
# release pinned in go.mod, and etcd of the version that release requires. Output goes to a
# cache outside the tree ($SVCPROXY_KUBE_SERVERS, default ~/.cache/svcproxy/kube-servers),
# rebuilt only when go.mod or go.sum change. Prints the directory.
#
# Needs Go 1.26 (/usr/local/go is taken before any other on PATH) and the Go module proxy.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${SVCPROXY_KUBE_SERVERS:-${HOME:-/root}/.cache/svcproxy/kube-servers}"
export PATH="/usr/local/go/bin:$PATH"
stamp="$(cat "$here/go.mod" "$here/go.sum" "$here/etcd/main.go" | sha256sum | cut -d' ' -f1)"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "$out"
    exit 0
fi
mkdir -p "$out"
version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/go.mod")"
minor="$(echo "$version" | cut -d. -f2)"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version"
ldflags="$ldflags -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
(cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$out/" k8s.io/kubernetes/cmd/kube-apiserver ./etcd) >&2
echo "$stamp" > "$out/stamp"
echo "$out"

//go:build tools

// The commands this module builds, named so that go mod tidy keeps their dependencies.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"

module github.com/svcproxy/svcproxy/ffi/go

go 1.19

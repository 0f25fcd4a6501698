"""containerd's gRPC API as lazyfs uses it: the generated protobuf messages (`api/`), typed
method bindings for clients and servers (`rpc`), and the client calls of `lazyfs pull
--containerd`. I/O only: no knowledge of layers or mounts."""

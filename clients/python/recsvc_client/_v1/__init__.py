"""Generated protobuf and gRPC code for recsvc.v1 (built from ``proto/``, not committed)."""

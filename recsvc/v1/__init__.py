"""Generated protobuf and gRPC code for recsvc.v1 (built by ``make proto``, not committed)."""

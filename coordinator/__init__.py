"""The coordinator: runs, registry, ledger, audits and checkpoints behind one gRPC service."""

"""Data plane: the gateway shards of one shard range, their broker connection and command consumer (not built
yet; see the project's issues)."""

"""Serving batches from Ray actors that each own a memory-mapped pair-row shard (``ShardedJasper``)."""

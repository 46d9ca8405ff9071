"""The engine and what it stands on: config, cache, attention, rope, sampling, the stream engine."""

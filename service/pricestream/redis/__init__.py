"""The Redis backend: client settings, Pub/Sub broker, session store and command batching."""

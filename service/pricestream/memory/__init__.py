"""In-process backends with the Redis ones' semantics, for the Redis-less demo."""

"""The streaming engine: hub, flush clock, streams, session registry and the backend contracts."""

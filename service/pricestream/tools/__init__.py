"""Commands beside the server: feed, demo, watch, health, leak check, log audit, load tester."""

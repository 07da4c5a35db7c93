"""`pricestream loadtest`: virtual users that follow the real client flow, over several worker
processes, with a per-stage report, plots and a leak verdict read from the server's /metrics."""

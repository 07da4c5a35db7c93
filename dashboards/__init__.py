"""Grafana dashboards as code: `python -m dashboards.generate` writes them into the Helm chart."""

"""Grafana dashboards as code on Grafana's own builders (grafana-foundation-sdk, Grafana 11.6):
`style` makes every panel in the house style, `grafana` adds variables, annotations and the
JSON encoding, `python -m dashboards.generate` writes each dashboard into the Helm chart."""

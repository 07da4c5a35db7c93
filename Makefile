# pricestream — newcomers need two targets: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools
HELM_VERSION := v3.22.0
HELM := $(TOOLS)/bin/helm
PROTO := proto/pricestream/v1/pricestream.proto

.PHONY: demo test setup system-deps venv helm proto dashboards lint bench clean

demo: venv  ## server + feed + live table, Redis if reachable else in memory
	$(VENV)/bin/pricestream demo

test: setup lint  ## the whole suite against real redis-server, Prometheus, Alertmanager
	$(PY) -m pytest -q

setup: system-deps venv helm

system-deps:  ## apt-get what is missing (needs root); quick when present
	@scripts/ensure-system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

helm: $(HELM)

$(HELM):
	mkdir -p $(TOOLS)/bin
	GOBIN=$(TOOLS)/bin go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

proto: venv  ## regenerate the committed gRPC stubs
	$(PY) -m grpc_tools.protoc -Iproto --python_out=service --pyi_out=service \
		--grpc_python_out=service $(PROTO)

dashboards: venv  ## regenerate the committed Grafana JSON inside the chart
	$(PY) -m dashboards.generate

lint: venv
	$(VENV)/bin/ruff check service tests dashboards scripts
	$(VENV)/bin/ruff format --check service tests dashboards scripts

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache

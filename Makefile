# pricestream — newcomers need two targets: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := $(CURDIR)/.tools
HELM_VERSION := v3.22.0
HELM := $(TOOLS)/bin/helm
# v2.2.1 has no go.mod: `go install` resolves its dependencies to their latest versions.
H2SPEC_VERSION := v2.2.1+incompatible
H2SPEC := $(TOOLS)/bin/h2spec
CENTRIFUGO_VERSION := v6.9.1
CENTRIFUGO := $(TOOLS)/bin/centrifugo
GRPCURL_VERSION := v1.9.4
GRPCURL := $(TOOLS)/bin/grpcurl
# The grpc-go conformance client of tests/test_grpc_clients.py (its own module, tests/grpcgo).
GRPCGO := $(TOOLS)/bin/grpcgo
# Its own source and the wire helpers it shares with bench/loadclient (bench/grpcwire).
GRPCGO_SOURCES := $(wildcard tests/grpcgo/*.go) tests/grpcgo/go.mod tests/grpcgo/go.sum \
	$(filter-out %_test.go,$(wildcard bench/grpcwire/*.go)) bench/grpcwire/go.mod bench/grpcwire/go.sum
PROTO := proto/pricestream/v1/pricestream.proto
CHART := deploy/helm/pricestream
APP_VERSION := $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' $(CHART)/Chart.yaml)
IMAGE := pricestream:$(APP_VERSION)
KIND_CLUSTER ?= pricestream
KPS_RELEASE ?= kps
NAMESPACE ?= pricestream

.PHONY: demo test setup system-deps venv helm h2spec centrifugo grpcurl grpcgo proto dashboards slo schema lint bench clean \
	kind-up image kind-load deploy grafana kind-down e2e e2e-build e2e-up e2e-down

demo: venv  ## server + feed + live table, Redis if reachable else in memory
	$(VENV)/bin/pricestream demo

test: setup lint  ## the whole suite against real redis-server, Prometheus, Alertmanager
	$(PY) -m pytest -q

setup: system-deps venv helm h2spec centrifugo grpcurl grpcgo

system-deps:  ## apt-get what is missing (needs root); quick when present
	@scripts/ensure-system-deps.sh

venv: $(VENV)/.installed

# uv (from PyPI, pinned) installs the dependencies from its cache in seconds where pip took 50 s
# on a fresh clone with a warm pip cache; the virtualenv's own pip stays for users.
UV_VERSION := 0.13.9
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(PY) -m uv pip install -q --python $(PY) -e '.[dev]'
	touch $@

# The Go tools: scripts/go-tool.sh leaves a binary that is already the pinned version alone and
# otherwise copies it from ~/.cache/pricestream-tools (keyed by version and Go toolchain), running
# `go install` only on a miss (the binary's own version string reads 0.0.0 under go install, so
# the check reads the module's from `go version -m`).
helm:  ## helm $(HELM_VERSION) into $(TOOLS)/bin
	@scripts/go-tool.sh $(HELM) helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

h2spec:  ## the HTTP/2 conformance suite, for tests/test_h2spec.py
	@scripts/go-tool.sh $(H2SPEC) github.com/summerwind/h2spec/cmd/h2spec@$(H2SPEC_VERSION)

centrifugo:  ## Centrifugo $(CENTRIFUGO_VERSION) into $(TOOLS)/bin, for side-by-side benchmarks
	@scripts/go-tool.sh $(CENTRIFUGO) github.com/centrifugal/centrifugo/v6@$(CENTRIFUGO_VERSION)

grpcurl:  ## grpcurl through reflection, for tests/test_grpc_clients.py
	@scripts/go-tool.sh $(GRPCURL) github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

grpcgo: $(GRPCGO)  ## the grpc-go client checks of tests/test_grpc_clients.py (rebuilt when its source changes)

$(GRPCGO): $(GRPCGO_SOURCES)
	mkdir -p $(TOOLS)/bin
	cd tests/grpcgo && nice -n 10 go build -o $(GRPCGO) .

proto: venv  ## regenerate the committed gRPC stubs
	$(PY) -m grpc_tools.protoc -Iproto --python_out=service --pyi_out=service \
		--grpc_python_out=service $(PROTO)

# In its own session (setsid) and, as root, at round-robin real-time priority 1: on a machine
# where other work runs, the bench's processes come first (the kernel still keeps 5% of each
# core for the rest), so its figures do not swing with that work.
BENCH_PRIORITY := $(if $(filter 0,$(shell id -u)),chrt --rr 1,)
bench: system-deps venv centrifugo  ## server on one core vs the Go load client, Centrifugo side by side (needs go); appends docs/benchmarks.md
	setsid --wait $(BENCH_PRIORITY) $(PY) scripts/bench.py $(BENCH_ARGS)

dashboards: venv  ## regenerate the committed Grafana JSON inside the chart
	$(PY) -m dashboards.generate

slo: venv  ## regenerate the chart's SLO rules (files/rules/slo.rules.yaml) from deploy/slo/slos.yaml
	$(PY) scripts/slo_rules.py

schema: venv  ## regenerate the chart's values.schema.json from values.yaml
	$(PY) scripts/values_schema.py

lint: venv
	$(VENV)/bin/ruff check service tests dashboards scripts
	$(VENV)/bin/ruff format --check service tests dashboards scripts

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache

# --- Kubernetes with kind (needs Docker, kind and kubectl on your machine; not run in CI) ---

kind-up: helm  ## kind cluster + kube-prometheus-stack + prometheus-adapter (sessions per pod)
	kind create cluster --name $(KIND_CLUSTER) --wait 120s
	$(HELM) repo add prometheus-community https://prometheus-community.github.io/helm-charts --force-update
	$(HELM) repo update prometheus-community
	$(HELM) upgrade --install $(KPS_RELEASE) prometheus-community/kube-prometheus-stack \
		--namespace monitoring --create-namespace --wait --timeout 10m
	$(HELM) upgrade --install prometheus-adapter prometheus-community/prometheus-adapter \
		--namespace monitoring -f deploy/kind/prometheus-adapter-values.yaml --wait

image:  ## build the server image (Dockerfile)
	docker build -t $(IMAGE) .

kind-load: image  ## load the image into the kind cluster's nodes
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)

deploy: helm  ## install or upgrade the chart with ci/kind-values.yaml, then run its helm test
	$(HELM) upgrade --install pricestream $(CHART) --namespace $(NAMESPACE) --create-namespace \
		-f $(CHART)/ci/kind-values.yaml --set image.tag=$(APP_VERSION) --wait --timeout 5m
	$(HELM) test pricestream --namespace $(NAMESPACE)

grafana:  ## port-forward Grafana and print where to look
	@echo "Grafana: http://localhost:3000 (admin / prom-operator), dashboard 'pricestream / overview'"
	kubectl --namespace monitoring port-forward svc/$(KPS_RELEASE)-grafana 3000:80

kind-down:  ## delete the kind cluster
	kind delete cluster --name $(KIND_CLUSTER)

# --- Kubernetes for real, without Docker: a single-node cluster built from Go modules (tests/e2e/cluster/) ---
# Binaries and images are cached in $E2E_CACHE (default ~/.cache/pricestream-e2e: outside the
# clone, so a fresh clone reuses them), keyed by version or by a hash of the inputs; the cluster's state lives in
# E2E_STATE (default /tmp/pricestream-e2e) and is removed by e2e-down, also after a failed start.

e2e: venv helm  ## build (cached), start the e2e cluster, run tests/test_e2e.py on it, take it down
	tests/e2e/cluster/run.sh

e2e-build: helm  ## only build and cache the cluster binaries, the monitoring stack and the images
	scripts/ensure-system-deps.sh e2e
	tests/e2e/cluster/build-cluster-bins.sh
	tests/e2e/cluster/build-monitoring-bins.sh
	tests/e2e/cluster/build-images.sh

e2e-up:  ## start the e2e cluster (after e2e-build) and leave it running; KUBECONFIG is printed
	tests/e2e/cluster/cluster-up.sh

e2e-down:  ## stop the e2e cluster and remove everything it made
	tests/e2e/cluster/cluster-down.sh

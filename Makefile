# villi — build, test and demo entry points. `make deps` is idempotent and is run by
# every other target, so a fresh Debian 12 machine needs only `make demo` / `make test`.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := clang llvm libbpf-dev bpftool iproute2 iptables iperf3 sockperf \
	etcd-server etcd-client iputils-ping netcat-openbsd curl tcpdump \
	podman runc busybox-static containernetworking-plugins python3-venv wrk dnsmasq-base \
	nodejs chromium chromium-driver openssl
APT_STAMP := $(VENV)/.apt-stamp
PIP_STAMP := $(VENV)/.pip-stamp
UI_WEB    := src/villi/ui/web
NPM_STAMP := $(UI_WEB)/node_modules/.npm-stamp

.PHONY: deps demo test test-unit test-e2e bench lint clean proto

deps: $(PIP_STAMP) $(NPM_STAMP)

# The web UI's front-end libraries (cytoscape), vendored from npm at build time and
# served by `villi ui` itself: the page never loads anything from a CDN.
$(NPM_STAMP): $(APT_STAMP) $(UI_WEB)/package.json $(UI_WEB)/package-lock.json
	@command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm
	cd $(UI_WEB) && npm ci --no-audit --no-fund --silent
	@touch $@

$(APT_STAMP): Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(PIP_STAMP): $(APT_STAMP) pyproject.toml
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	@touch $@

demo: deps
	$(VENV)/bin/villi demo

test: deps
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: deps
	$(PY) -m pytest -q tests/unit

test-e2e: deps
	$(PY) -m pytest -q tests/e2e

bench: deps
	$(PY) bench/datapath.py

lint: deps
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

# Regenerate the committed gRPC modules after editing src/villi/relay/proto/*.proto.
proto: deps
	cd src && ../$(PY) -m villi.relay.proto.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

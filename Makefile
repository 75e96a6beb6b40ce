# thinvisor: `make demo` and `make test` on a fresh Debian 12 machine, as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps

# Everything thinvisor and its tests need from Debian. libvirt-dev, pkg-config and gcc
# build libvirt's Python binding; libvirtd (started by hand by the tests, never as a
# service), PostgreSQL (a private cluster per test run) and govmomi's vSphere simulator
# (built with Go, offline) are the center's real peers in the tests.
APT_PACKAGES := qemu-system-x86 qemu-utils seabios ipxe-qemu util-linux cpio nftables dnsmasq-base iproute2 busybox-static lz4 \
	python3-venv python3-dev \
	xorriso isolinux syslinux syslinux-common mtools dosfstools sblim-wbemcli \
	libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc \
	postgresql golang-go golang-github-vmware-govmomi-dev

.PHONY: all deps demo test lint unit functional bench clean

all: deps

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing from Debian: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	getent group libvirt-qemu >/dev/null || addgroup --quiet --system libvirt-qemu
	getent passwd libvirt-qemu >/dev/null || adduser --quiet --system --ingroup libvirt-qemu \
		--home /var/lib/libvirt --no-create-home --disabled-login --disabled-password libvirt-qemu
	@touch $@

$(BIN)/thinvisor: pyproject.toml $(STAMPS)/apt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# pywbemcli, a real CIM client for the tests, in its own environment: its pins do not
# fit beside the agent's.
TOOLS := .venv-tools
$(TOOLS)/bin/pywbemcli: $(STAMPS)/apt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q pywbemtools==1.4.1
	@touch $@

deps: $(BIN)/thinvisor $(TOOLS)/bin/pywbemcli

demo: deps
	$(BIN)/python -m thinvisor.demo

lint: deps
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

unit: deps
	$(BIN)/pytest tests/unit

functional: deps
	$(BIN)/pytest tests/functional

test: lint
	$(BIN)/pytest tests

# `make bench`: thinvisor against QEMU started by hand and libvirt (bench/README.md).
# libvirt comes from Debian without libvirt-daemon-system: the harness starts libvirtd
# by hand and stops it after, and no default NAT network is installed. libvirtd runs
# QEMU as Debian's libvirt-qemu user, made with the Debian packages above as
# libvirt-daemon-system would make it.
# `make bench BENCH_ARGS="power boot --rounds 7"` runs some of them.
BENCH_ARGS ?=

$(STAMPS)/bench-python: pyproject.toml $(BIN)/thinvisor
	$(BIN)/pip install -q -e '.[dev,bench]'
	@touch $@

bench: $(STAMPS)/bench-python
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TOOLS) $(STAMPS) build src/*.egg-info

# govmomi's vSphere simulator, the vsphere provider's peer in the tests: built offline with
# Debian's Go into build/vcsim/, once per version of its source (a no-op when built).
.PHONY: vcsim
vcsim: $(BIN)/thinvisor
	$(BIN)/python -m tests.peers.vcsim

test: vcsim

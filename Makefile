# ipvs2nft developer entry points.  `make test` and `make demo` run `make setup` first.
# The python3 on PATH may be a pyenv shim that cannot import python3-nftables:
# the venv is made from /usr/bin/python3 with --system-site-packages.
# busybox-static: the oracle's own httpd, which tests/oracle_lab.py serves with.

PYTHON   ?= /usr/bin/python3
VENV     := .venv
VPY      := $(VENV)/bin/python
APT_PKGS := nftables python3-nftables python3-venv iproute2 conntrack iptables procps busybox-static \
            python3-prometheus-client prometheus prometheus-node-exporter systemd \
            debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools ipvsadm conntrackd \
            snmpd snmp
# busybox-static: the oracle-like lab's httpd (tests/oracle_lab.py);
# python3-prometheus-client: the daemon's --metrics (Debian's, as the package
# Recommends it); prometheus (promtool) and prometheus-node-exporter check
# the metrics in the tests; systemd (systemd-analyze) verifies the units;
# debhelper, dh-python, pybuild-plugin-pyproject build `make deb`; Debian's ipvsadm is
# installed so that the package test always has its files to divert and give back;
# conntrackd runs --start-daemon's connection sync.
# snmpd and snmp (net-snmp's agent and tools): the SNMP feedback-weight tests run a real agent.
VERSION   = $(shell $(PYTHON) -c 'import re; print(re.search(r"__version__ = \"(.+)\"", open("ipvs2nft/__init__.py").read())[1])')
DEB       := dist/ipvs2nft_$(VERSION)_all.deb
STAMP    := $(VENV)/.setup-stamp
# CI and `make test` run everything; PYTEST_ARGS narrows it (e.g. -m "not netns").
PYTEST_ARGS ?=

.PHONY: setup test demo bench man check-man lint clean deb

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VPY) -m pip install -q --config-settings editable_mode=compat -e '.[test,docs,snmp]'
	$(VPY) -c 'import nftables' || { echo "python3-nftables is not importable from $(VENV)"; exit 1; }
	touch $(STAMP)

test: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VPY) -m ipvs2nft.demo

bench: setup
	$(VPY) bench/run.py

man: setup
	$(VPY) -m ipvs2nft.manpages man

lint: setup
	$(VPY) -m ruff check ipvs2nft tests bench

# The Debian package, built with the distribution's tools (debhelper,
# dh-python/pybuild) in a copy of the tree, so that nothing is written
# beside the checkout (dpkg-buildpackage puts the .deb in the parent).
deb: setup
	rm -rf build/deb && mkdir -p build/deb/ipvs2nft-$(VERSION) dist
	tar -c --exclude=./.venv --exclude=./build --exclude=./dist --exclude=./.git \
	    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache . \
	  | tar -x -C build/deb/ipvs2nft-$(VERSION)
	# the distribution's python3 (a pyenv shim on PATH has none of dh-python's modules)
	cd build/deb/ipvs2nft-$(VERSION) && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	  dpkg-buildpackage -b -us -uc > ../build.log 2>&1 \
	  || { tail -40 ../build.log; exit 1; }
	mv build/deb/ipvs2nft_$(VERSION)_all.deb $(DEB)
	@echo "built $(DEB)"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache

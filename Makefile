# ipvs2nft developer entry points.  `make test` and `make demo` run `make setup` first.
# The python3 on PATH may be a pyenv shim that cannot import python3-nftables:
# the venv is made from /usr/bin/python3 with --system-site-packages.
# busybox-static: the oracle's own httpd, which tests/oracle_lab.py serves with.

PYTHON   ?= /usr/bin/python3
VENV     := .venv
VPY      := $(VENV)/bin/python
APT_PKGS := nftables python3-nftables python3-venv iproute2 conntrack iptables procps busybox-static conntrackd
STAMP    := $(VENV)/.setup-stamp
# CI and `make test` run everything; PYTEST_ARGS narrows it (e.g. -m "not netns").
PYTEST_ARGS ?=

.PHONY: setup test demo bench man check-man lint clean

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VPY) -m pip install -q --config-settings editable_mode=compat -e '.[test,docs]'
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

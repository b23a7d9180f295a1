# fleet: the two commands a user needs are `make demo` and `make test`.
# Both install everything first (system packages need root or sudo).

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine use e.g. TORCH_SPEC=torch (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
SYSTEM_PACKAGES := openssh-server openssh-client sshfs fuse3 rsync chromium iproute2 nftables
PYTEST_ARGS ?=

.PHONY: install system-packages test demo bench lint clean

install: system-packages $(VENV)/.installed

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# No udev here (containers, fresh VMs): apply the fuse package's rule (MODE 0666) by hand, so
	@# that ordinary users can mount with sshfs.
	@if [ -c /dev/fuse ] && [ "$$(stat -c %a /dev/fuse)" != 666 ]; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; echo "chmod 0666 /dev/fuse"; $$SUDO chmod 0666 /dev/fuse; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[worker,report,test]'
	touch $@

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

bench: install
	@for b in benchmarks/[a-z]*.py; do echo "== $$b"; $(PY) $$b | tail -n 1; done

lint: install
	$(VENV)/bin/ruff check fleet tests benchmarks

clean:
	rm -rf $(VENV) .fleet .pytest_cache

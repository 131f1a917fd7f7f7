# The two commands that set up everything on a fresh machine:
#   make demo  - venv, install the lite and data extras only, index real sample photos, answer a text query
#   make test  - venv, install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These machines serve this torch build from a local file; any torch >= 2.4 works elsewhere.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
QUERY ?= a cat

.PHONY: venv demo test test-fast system-packages clean

# The demo needs only the lite encoder and the sample photos (the data extra); the tests add their extras
# (serve, Ray, OpenVINO, ...) on top.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.installed-lite: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[lite,data]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install -q -e '.[lite,data,test]'
	touch $@ $(VENV)/.installed-lite

venv: $(VENV)/.installed-test

demo: $(VENV)/.installed-lite
	$(VENV)/bin/clipxfer sample-photos $(DEMO_DIR)/photos
	$(VENV)/bin/clipxfer index $(DEMO_DIR)/photos --index $(DEMO_DIR)/index
	$(VENV)/bin/clipxfer search "$(QUERY)" --index $(DEMO_DIR)/index -k 5

# Debian packages the tests use: Fashion-MNIST (dataset-fashion-mnist) and chromium + chromium-driver for
# the browser test (Playwright's own browser download cannot work offline). Installed when missing, as
# root or through sudo (waiting up to 5 minutes for another apt run's lock); where neither works, the tests
# that need them skip with the install command.
FASHION_MNIST_DIR ?= $(or $(CLIPXFER_FASHION_MNIST),/usr/share/datasets/fashion-mnist)
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo >/dev/null && echo sudo -n))
MISSING = $(if $(wildcard $(FASHION_MNIST_DIR)),,dataset-fashion-mnist) $(if $(wildcard /usr/bin/chromium),,chromium chromium-driver)

system-packages:
	@if [ -n "$(strip $(MISSING))" ]; then \
		echo "installing Debian packages for the tests: $(strip $(MISSING))"; \
		($(SUDO) apt-get -o DPkg::Lock::Timeout=300 update -qq && \
		 DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -o DPkg::Lock::Timeout=300 install -y -qq $(MISSING) >/dev/null) \
			|| echo "could not install $(strip $(MISSING)); the tests that need them will be skipped"; \
	fi

test: $(VENV)/.installed-test system-packages
	$(PY) -m pytest -n 2 -q

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

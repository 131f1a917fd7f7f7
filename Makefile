# The two commands that set up everything on a fresh machine:
#   make demo  - venv, install with the lite extra, index real sample photos, answer a text query
#   make test  - venv, install with test extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These machines serve this torch build from a local file; any torch >= 2.4 works elsewhere.
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo
QUERY ?= a cat

.PHONY: venv demo test test-fast clean browser
# The serve tests drive Debian's chromium (Playwright's own browser download cannot work offline).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[lite,test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/clipxfer sample-photos $(DEMO_DIR)/photos
	$(VENV)/bin/clipxfer index $(DEMO_DIR)/photos --index $(DEMO_DIR)/index
	$(VENV)/bin/clipxfer search "$(QUERY)" --index $(DEMO_DIR)/index -k 5

browser:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: venv browser
	$(PY) -m pytest -n 2 -q

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

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

.PHONY: venv demo test test-fast fashion-mnist clean

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

# Fashion-MNIST comes from Debian (dataset-fashion-mnist): installed here when missing and run as
# root; otherwise the tests that need it are skipped with the install command as the reason.
FASHION_MNIST_DIR ?= $(or $(CLIPXFER_FASHION_MNIST),/usr/share/datasets/fashion-mnist)

fashion-mnist:
	@if [ ! -d $(FASHION_MNIST_DIR) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing dataset-fashion-mnist (Debian) for the tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
			|| echo "could not install dataset-fashion-mnist; the tests that need it will be skipped"; \
	elif [ ! -d $(FASHION_MNIST_DIR) ]; then \
		echo "dataset-fashion-mnist is not installed (needs root: sudo apt-get install dataset-fashion-mnist);" \
			"the tests that need it will be skipped"; \
	fi

test: venv fashion-mnist
	$(PY) -m pytest -n 2 -q

test-fast: venv
	$(PY) -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache

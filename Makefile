# The two commands of the README. Both install what they need into the Python that runs them
# (use a virtual environment: `python3 -m venv .venv && . .venv/bin/activate`). utils/ensure_installed.py calls
# pip only when something is missing: minis not installed editable from this checkout, setup.py changed since,
# or a requirement of the extras not met. It installs CPU torch 2.13.0 first when torch is missing, and never
# replaces a torch that is there.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: install install-test demo test test-compat test-fast

install:
	$(PYTHON) utils/ensure_installed.py --extras demo

# Also fetches transformers' common model tests for tests/test_upstream_common.py (utils/fetch_upstream_tests.py: the
# installed transformers version's sdist from PyPI, once). When that fails (offline), the rest still installs and
# runs; the upstream tests then fail and name the command to run.
install-test:
	$(PYTHON) utils/ensure_installed.py --extras test,plot,deepspeed
	-$(PYTHON) utils/fetch_upstream_tests.py

# Trains a small Llama built from a config with and without minis and compares loss, memory and speed.
demo: install
	$(PYTHON) -m minis demo

# Installs the test needs and runs the whole suite (CPU; GPU and multi-process tests say why they skip).
test: install-test
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

# The core suite (tests marked `core`, see pytest.ini) against another transformers release in its own venv
# (default: 5.0.0, the oldest that setup.py allows; the core suite passes on it).
TRANSFORMERS_VERSION ?= 5.0.0
test-compat:
	test -x .venv-compat/bin/python || $(PYTHON) -m venv .venv-compat
	.venv-compat/bin/python utils/ensure_installed.py --extras test "transformers==$(TRANSFORMERS_VERSION)"
	.venv-compat/bin/python -m pytest tests -m core $(PYTEST_ARGS)

test-fast:
	$(PYTHON) -m pytest tests -m "not slow" $(PYTEST_ARGS)

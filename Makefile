# Two commands a newcomer needs: `make demo` and `make test`. Both install what they use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# PyTriton pins numpy<2, so the real Triton server used by the tests lives in its own virtualenv.
TRITON_VENV := .venv-triton
# The provisioning checks (cfn-lint, ansible-lint, checkov, ...) pin their own tool versions.
DEPLOY_VENV := .venv-deploy
PYTEST_ARGS ?=

.PHONY: demo demo-s3 test test-fast test-deploy bench system-deps clean lock package

# uv installs every virtualenv's packages (the same versions as pip, in a tenth of the time: the
# provisioning tools took pip over a minute); pip only fetches uv itself into the gateway's virtualenv.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv

$(VENV)/.uv:
	@echo "==> $(VENV): creating it with uv $(UV_VERSION), the installer for every virtualenv here"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv==$(UV_VERSION)'
	touch $@

# Versions come from requirements.lock (what CI tested). The demo needs only the core install; the
# tests add their tools, the AWS SDK and the Triton client. uv prints what it fetches as it goes.
# Installed with their bytecode, as pip installs a release (Ansible, the image): without it every
# process compiles each module it imports, and where PYTHONDONTWRITEBYTECODE is set it does so at
# every start (a gateway took 0.97 s to be ready instead of 0.50 s, each process 2-4 MiB more).
$(VENV)/.core: $(VENV)/.uv pyproject.toml requirements.lock
	@echo "==> $(VENV): installing the gateway's core (about 340 MB)"
	$(UV) pip install --compile-bytecode --python $(PY) -c requirements.lock -e .
	$(PY) -m compileall -q gateway batching connectors
	touch $@

$(VENV)/.installed: $(VENV)/.core
	@echo "==> $(VENV): adding the test tools, the AWS SDK and the Triton client"
	$(UV) pip install --compile-bytecode --python $(PY) -c requirements.lock -e '.[test]'
	touch $@

# After a dependency change in pyproject.toml: reinstall, run the tests, then record what they ran with.
lock: $(VENV)/.installed
	{ echo "# Versions the test suite runs with: pip constraints for \`make\` and CI (pip install -c requirements.lock)."; \
	  echo "# Regenerate after changing dependencies in pyproject.toml: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -e '^edge-gateway' -e '^uv=='; } > requirements.lock

$(TRITON_VENV)/.installed: tests/triton/requirements.txt $(VENV)/.uv
	$(PYTHON) -m venv $(TRITON_VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(TRITON_VENV)/bin/python -r tests/triton/requirements.txt
	touch $@

$(DEPLOY_VENV)/.installed: deploy/requirements-lint.txt deploy/install-lint-tools.sh $(VENV)/.uv
	PYTHON=$(PYTHON) UV=$(abspath $(UV)) bash deploy/install-lint-tools.sh $(DEPLOY_VENV)
	touch $@

# Debian packages the tests start for real: HAProxy (TLS termination in front of the gateway),
# Chromium for the status page's browser test, and the zstd command an operator reads raw objects with.
system-deps:
	@command -v haproxy >/dev/null 2>&1 || sh tests/fixtures/install-haproxy.sh
	@command -v chromium >/dev/null 2>&1 || sh tests/fixtures/install-browser.sh
	@ldconfig -p | grep -q 'libfuse\.so\.2' || sh tests/fixtures/install-fuse.sh
	@command -v cc >/dev/null 2>&1 || sh tests/fixtures/install-compiler.sh
	@command -v zstd >/dev/null 2>&1 || sh tests/fixtures/install-zstd.sh

demo: $(VENV)/.core
	$(VENV)/bin/edge-gateway demo $(DEMO_ARGS)

demo-s3: $(VENV)/.installed
	$(VENV)/bin/edge-gateway demo --s3 $(DEMO_ARGS)

# The crash tests (tests/durability) mostly wait on the gateways they drive: two at a time take
# half as long.
test: $(VENV)/.installed $(TRITON_VENV)/.installed $(DEPLOY_VENV)/.installed system-deps
	$(PY) -m pytest --ignore=tests/deploy --ignore=tests/durability $(PYTEST_ARGS)
	$(PY) -m pytest tests/durability -n 2 $(PYTEST_ARGS)
	$(DEPLOY_VENV)/bin/python -m pytest tests/deploy -p no:cacheprovider $(PYTEST_ARGS)

# The quick loop while coding: no subprocess crash tests, no real Triton, no provisioning checks.
test-fast: $(VENV)/.installed
	$(PY) -m pytest --ignore=tests/deploy -m "not slow and not triton" $(PYTEST_ARGS)

# The AZ failover drill, run for real on this machine: three gateways standing for zones a, b, c
# behind HAProxy, signed devices, the runbook deploy/runbooks/az-failover.yaml (shared with the cloud
# drill). A few minutes; report in var/drill/report/. Another shape: DRILL_ARGS="--config drill.toml".
.PHONY: drill
drill: $(VENV)/.installed system-deps
	$(VENV)/bin/edge-gateway drill $(DRILL_ARGS)

# Release artifacts, built offline: the bundle hosts provision from (wheelhouse, pinned Ansible and
# collections) and the packaged templates. `make package ARTIFACT_BUCKET=<bucket>`; deploy/README.md.
ARTIFACT_PREFIX ?= releases
PACKAGE_DIR ?= build/package
package: $(DEPLOY_VENV)/.installed
	PYTHON=$(DEPLOY_VENV)/bin/python bash deploy/package.sh --s3-bucket "$(ARTIFACT_BUCKET)" \
		--s3-prefix "$(ARTIFACT_PREFIX)" --out "$(PACKAGE_DIR)"

bench: $(VENV)/.installed $(TRITON_VENV)/.installed
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(DEPLOY_VENV) var .pytest_cache bench-report

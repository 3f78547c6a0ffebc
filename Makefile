# voxrelay — the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')

.PHONY: run test test-cluster test-deps wheelhouse image proto proto-check buf-lint lint types check bench soak clean venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Serve on the embedded defaults (no API key needed).
run: $(STAMP)
	exec $(BIN)/voxrelay serve

## The whole suite, bootstrapping the venv first (the cluster test runs on its own: below).
test: $(STAMP) proto-check
	$(BIN)/python -m pytest -q --ignore=tests/cluster $(PYTEST_ARGS)

## The cluster test: redis-server, two replicas of two workers each, nginx in front, all on
## 127.0.0.1 (about a minute; skipped, naming `make test-deps`, without redis-server or nginx).
test-cluster: $(STAMP) proto-check
	$(BIN)/python -m pytest -q tests/cluster $(PYTEST_ARGS)

## What the suite needs from the system (Debian/Ubuntu; as root or through sudo). Without
## them `make test` still runs, skips their tests and lists them at the end.
##   redis-server: shared limits · nginx: the nginx front · chromium, chromium-driver: the
##   demo page · ffmpeg: decoding checks · prometheus: promtool · openssl: TLS certificates ·
##   buildah, podman, debootstrap: the container image
TEST_DEPS := redis-server nginx chromium chromium-driver ffmpeg prometheus openssl \
             buildah podman debootstrap
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

test-deps:
	@missing=$$(for p in $(TEST_DEPS); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -z "$$missing" ]; then echo "test-deps: all installed"; exit 0; fi; \
	echo "test-deps: apt-get install" $$missing; \
	export DEBIAN_FRONTEND=noninteractive; \
	$(SUDO) apt-get update -qq && \
	$(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null

## voxrelay's wheel and every dependency's, for the image build (which uses no index).
## Plus what the image's Python needs and this one may not: Debian's Python 3.11.2 is
## older than 3.11.3, below which redis needs async-timeout.
IMAGE_ONLY_WHEELS := async-timeout==5.0.1
wheelhouse: $(STAMP)
	rm -rf build/wheelhouse
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check -w build/wheelhouse . \
	  $(IMAGE_ONLY_WHEELS)

## The container image (not part of `make test`): needs buildah, podman and debootstrap.
image: wheelhouse
	scripts/image.sh

## Regenerate generated/ from protos/.
proto: $(STAMP)
	$(BIN)/python -m scripts.genproto generated

## Fail when generated/ does not match protos/.
proto-check: $(STAMP)
	$(BIN)/python -m scripts.genproto --check generated

BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

## buf lint on protos/ (buf ships in the npm package @bufbuild/buf).
buf-lint: $(BUF)
	$(BUF) lint

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check service gateways client tests scripts bench fakes

## mypy --strict on the packages as they install: voxrelay.{service,gateways,client} beside voxrelay.v1;
## and on the fakes, which must keep to the Protocols they stand in for.
TYPES_ROOT := build/typecheck
types: $(STAMP)
	rm -rf $(TYPES_ROOT) && mkdir -p $(TYPES_ROOT)/voxrelay
	for part in generated/voxrelay/__init__.py generated/voxrelay/py.typed generated/voxrelay/v1 \
	            service gateways client; do ln -s "$(CURDIR)/$$part" $(TYPES_ROOT)/voxrelay/; done
	MYPYPATH=$(TYPES_ROOT) $(BIN)/mypy -p voxrelay.service -p voxrelay.gateways -p voxrelay.client -p fakes

check: lint types proto-check buf-lint

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	touch $(BENCH_STAMP)

## The benchmark (about 45 minutes; `make bench BENCH_ARGS=--quick` for a 2-minute run).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

## The soak and abuse run: normal traffic and every attack at once, PASS/FAIL per criterion
## (about 13 minutes; `make soak SOAK_ARGS=--quick` for about 3½). Not part of `make test`.
soak: $(BENCH_STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# kiln — the two commands: `make demo` and `make test`. Both install what
# they need (Debian packages) when it is missing.

CARGO ?= cargo
PROFILE_DIR := target/debug
BIN := $(PROFILE_DIR)
DEMO_DIR ?= /tmp/kiln-demo

.PHONY: all build deps test unit-test integration-test demo demo-stop lint clean bench frontend-image images

all: build

deps:
	@sh scripts/install-deps.sh

build: deps
	$(CARGO) build --workspace --bins --tests

# Unit tests, then the integration tests against a real registry, real
# kilnd/kiln binaries, real runc and overlayfs.
test: build
	sh scripts/test.sh

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# the fuzz crate is outside the workspace: it must still compile
	cp Cargo.lock fuzz/Cargo.lock
	CARGO_TARGET_DIR=$(CURDIR)/target $(CARGO) check --manifest-path fuzz/Cargo.toml --all-targets

# Build everything, start a registry seeded with busybox and an all-in-one
# kilnd mirroring docker.io to it, then build examples/hello to an OCI image
# tarball and a local directory.
demo: build
	sh scripts/demo.sh "$(DEMO_DIR)"

demo-stop:
	sh scripts/demo.sh "$(DEMO_DIR)" stop

# Side-by-side benchmark against docker's BuildKit / buildah (bench/README.md).
# `make bench QUICK=1`: one repetition, smaller inputs.
QUICK ?=
bench:
	QUICK=$(QUICK) sh bench/run.sh

# kiln's Dockerfile frontend as a frontend image, built by kiln (the kilnd
# KILN_HOST names) and pushed: make frontend-image FRONTEND_IMAGE=REGISTRY/NAME:TAG
FRONTEND_IMAGE ?=
frontend-image: build
	@test -n "$(FRONTEND_IMAGE)" || { echo "give FRONTEND_IMAGE=REGISTRY/NAME:TAG"; exit 1; }
	KILN=$(BIN)/kiln sh scripts/frontend-image.sh $(BIN)/kiln-frontend "$(FRONTEND_IMAGE)"

# kiln's own images (kilnd with runc, and kiln), built by kiln from
# deploy/images/Dockerfile on a base of this machine's Debian packages, pushed
# to REGISTRY and loaded into Docker when an engine answers:
# make images REGISTRY=HOST:PORT [TAG=...]
REGISTRY ?=
TAG ?=
images: deps
	@test -n "$(REGISTRY)" || { echo "give REGISTRY=HOST:PORT"; exit 1; }
	$(CARGO) build --release -p kilnd -p kiln
	sh scripts/images.sh "$(REGISTRY)" $(TAG)

clean:
	$(CARGO) clean

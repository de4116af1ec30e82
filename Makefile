# berth — one Makefile for every lane. See README.md.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin
export CGO_ENABLED := 0

GO        ?= go
GOTAGS    := containers_image_openpgp,exclude_graphdriver_btrfs,exclude_graphdriver_devicemapper
# The commit berth reports (`berth version`); empty outside a git tree.
COMMIT    := $(shell git describe --always --dirty --abbrev=12 2>/dev/null)
GOFLAGS_B := -trimpath -tags $(GOTAGS) -ldflags='-s -w -X github.com/berth-dev/berth/internal/version.Commit=$(COMMIT)'
BIN       := bin
PREFIX    ?= /usr
DESTDIR   ?=
STATICCHECK_VERSION := v0.8.2

BINARIES := berth berthd berth-init
.PHONY: all build test guest unit roundtrip-usr lint fuzz e2e check bench bench-initramfs install deps demo vm man clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build $(GOFLAGS_B) -o $(BIN)/ ./cmd/... ./generators/...

## deps: install every Debian package and Go tool the lanes need (idempotent).
deps:
	test/deps.sh

## test: unit + privileged integration tests (privileged ones run as root, skip otherwise; with
## CI=true a missing tool, file, root or kernel feature fails instead), lint, bounded fuzzing.
test: build lint guest unit roundtrip-usr fuzz

## guest: the standard Debian trixie guest root filesystems (cached by recipe hash); privileged
## tests use them for a real kernel, modules, systemd-stub and systemd-measure.
guest:
	@if [ "$$(id -u)" = 0 ] && command -v mmdebstrap >/dev/null; then \
	  $(GO) run -tags $(GOTAGS) ./test/e2e/cmd/mkguest -recipe all; \
	else echo "guest: skipped (needs root and mmdebstrap); tests that need the guest rootfs will skip"; fi

## roundtrip-usr: composefs round trip through the kernel on a copy of /usr (>= 100,000 entries).
roundtrip-usr:
	BERTH_ROUNDTRIP_USR=1 $(GO) test -tags $(GOTAGS) -count=1 -timeout 20m -run '^TestRoundTripUsr$$' ./internal/composefs/

unit:
	$(GO) test -tags $(GOTAGS) -count=1 -timeout 40m ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy: run 'go mod tidy' (go mod tidy -diff shows what it would change)"; $(GO) mod tidy -diff; exit 1; }
	$(GO) vet -tags $(GOTAGS) ./...
	@command -v staticcheck >/dev/null || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	staticcheck -tags $(GOTAGS) ./...

## fuzz: each fuzz target for a bounded time (the seed corpus also runs in `unit`).
FUZZTIME ?= 15s
fuzz:
	@test/fuzz.sh $(FUZZTIME)

## e2e: the VM lane (qemu + OVMF + swtpm, Debian trixie guest).
e2e: build
	test/e2e/run.sh

check: deps test e2e

## bench-initramfs: the VM lane's trixie scenarios with the berth vs dracut initramfs
## comparison at 3 boots per side (make check boots each side once); opt-in, ~10 min more.
bench-initramfs: build
	BERTH_E2E_SIDEBYSIDE_BOOTS=3 E2E_RUN=TestTrixie test/e2e/run.sh

## bench: benchmarks that compare side by side and print ratios.
bench: build
	test/bench.sh

install: build
	install -d $(DESTDIR)$(PREFIX)/lib/berth $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN)/berth $(BIN)/berthd $(BIN)/berth-init $(DESTDIR)$(PREFIX)/lib/berth/
	ln -sf ../lib/berth/berth $(DESTDIR)$(PREFIX)/bin/berth
	install -d $(DESTDIR)$(PREFIX)/share/man/man1
	install -m 0644 docs/man/*.1 $(DESTDIR)$(PREFIX)/share/man/man1/
	install -d $(DESTDIR)$(PREFIX)/share/man/man8
	install -m 0644 docs/man/*.8 $(DESTDIR)$(PREFIX)/share/man/man8/
	install -d $(DESTDIR)$(PREFIX)/share/bash-completion/completions $(DESTDIR)$(PREFIX)/share/zsh/site-functions $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d
	$(BIN)/berth completion bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/berth
	$(BIN)/berth completion zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_berth
	$(BIN)/berth completion fish > $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/berth.fish
	chmod 0644 $(DESTDIR)$(PREFIX)/share/bash-completion/completions/berth $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_berth $(DESTDIR)$(PREFIX)/share/fish/vendor_completions.d/berth.fish
	@if [ -f $(BIN)/berth-generator ]; then \
	  install -d $(DESTDIR)$(PREFIX)/lib/systemd/system-generators; \
	  install -m 0755 $(BIN)/berth-generator $(DESTDIR)$(PREFIX)/lib/systemd/system-generators/; fi
	@if ls units/*.service units/*.timer >/dev/null 2>&1; then \
	  install -d $(DESTDIR)$(PREFIX)/lib/systemd/system; \
	  install -m 0644 units/*.service units/*.timer $(DESTDIR)$(PREFIX)/lib/systemd/system/ 2>/dev/null || true; fi
	install -d $(DESTDIR)$(PREFIX)/share/dbus-1/system.d $(DESTDIR)$(PREFIX)/share/dbus-1/system-services $(DESTDIR)$(PREFIX)/share/polkit-1/actions
	install -m 0644 data/dbus/org.berth1.conf $(DESTDIR)$(PREFIX)/share/dbus-1/system.d/
	install -m 0644 data/dbus/org.berth1.service $(DESTDIR)$(PREFIX)/share/dbus-1/system-services/
	install -m 0644 data/polkit/org.berth1.policy $(DESTDIR)$(PREFIX)/share/polkit-1/actions/
	@if [ -d dracut/90berth ]; then \
	  install -d $(DESTDIR)$(PREFIX)/lib/dracut/modules.d/90berth; \
	  install -m 0755 dracut/90berth/* $(DESTDIR)$(PREFIX)/lib/dracut/modules.d/90berth/; fi

## demo: the main job — build a bootable disk from a standard Debian image, boot it, upgrade, roll back.
demo: deps build
	test/e2e/run.sh demo

vm:
	test/e2e/run.sh vm

## man: regenerate docs/man from the command definitions (a test checks they are current).
man: build
	rm -f docs/man/*.1 && $(BIN)/berth docs man docs/man

clean:
	rm -rf $(BIN)

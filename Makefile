# One entry point. `make demo` runs the main job on a shipped benchmark model; `make test` runs every
# test (TransformerLens 4.x suite, then the 3.x pass). Both create the virtual environments they
# need inside the repository on first use (scripts/bootstrap.sh) and reuse them afterwards.
.PHONY: demo app fast test lint venv venv-tl3 browser screenshot hooks bench clean

demo: venv
	.venv/bin/tl-noise demo $(ARGS)

# the dashboard over a run or a folder of runs: make app RUN=runs/...
app: venv
	.venv/bin/tl-noise app $(or $(RUN),runs) $(ARGS)

# the quick loop: ruff and the fast tests (no slow, browser or 3.x pass)
fast: venv
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 -m "not slow and not browser"

test: venv venv-tl3 browser
	bash scripts/test.sh

lint: venv
	.venv/bin/ruff check .

venv:
	@bash scripts/bootstrap.sh .venv

venv-tl3:
	@bash scripts/bootstrap.sh .venv-tl3

browser:
	@bash scripts/install_browser.sh

# docs/dashboard.png and docs/circuit_graph.png, taken by the browser test (which otherwise writes
# temporary copies)
screenshot: venv browser
	TL_NOISE_UPDATE_SCREENSHOT=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_browser.py

bench: venv venv-tl3
	.venv/bin/python benchmarks/perf.py $(ARGS)
	.venv/bin/python -m benchmarks.quality

hooks:
	git config core.hooksPath hooks

clean:
	rm -rf .venv .venv-tl3 .pytest_cache .ruff_cache

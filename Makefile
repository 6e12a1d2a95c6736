# Hands-On Transformers. Every target creates .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# make test runs two pytest sessions side by side, one per core: nbgrader end to end (the sampled
# catalogs and the hostile suite), and everything else (the chapters under nbval, the catalog proofs,
# the unit tests), whose output goes to _build/test-chapters.log and is printed at the end.
# Each is a plain pytest process: torch runs one thread per process, since the two fill the cores.
# Each session is stopped after TEST_LIMIT seconds (make test takes about nine minutes on two cores):
# a hang becomes a failure that prints where it was (pytest's faulthandler_timeout dumps the stack of
# any test past 20 minutes) instead of a silent wait for an outside limit.
TEST_LIMIT ?= 2700
PYTEST = OMP_NUM_THREADS=1 timeout --signal=INT --kill-after=60 $(TEST_LIMIT) \
	$(PY) -m pytest -q -p no:cacheprovider --durations=10
E2E = tests/test_autograde.py tests/test_hostile.py
NBVAL = --nbval --nbval-current-env --nbval-cell-timeout=300 --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: help install book lab exercises autograde feedback report export run library collect bench test clean

help:
	@echo "make book       build the book into _build/html (warnings are errors)"
	@echo "make lab        open the exercises in JupyterLab (learner view; LAB_ARGS=... for jupyter lab)"
	@echo "make exercises  regenerate exercises/ from solutions/ (instructors)"
	@echo "make autograde  grade submitted/<student>/<assignment>/ and write grades.csv"
	@echo "make feedback   write feedback HTML (no hidden tests) to feedback/"
	@echo "make report     write the class report to reports/"
	@echo "make collect ASSIGNMENT=<a> ZIP=<file.zip>   import submissions downloaded from an LMS"
	@echo "make run NB=book/<id>.ipynb   re-execute a chapter, storing clean outputs (and the library)"
	@echo "make library   write handson/nn/<id>.py from the chapters' cells tagged export"
	@echo "make bench      measure Part III's promises (KV cache, tiled attention, MLA, attention vs SDPA) and time every notebook"
	@echo "make test       run every check CI runs"

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

install: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --all -W -n --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

# The learner's JupyterLab on exercises/ (as root too, headless too); nbgrader's instructor tools are
# off. Options for jupyter lab: make lab LAB_ARGS="--port=8899". tests/test_lab.py runs this recipe.
lab: $(STAMP)
	$(PY) handson/_lab/launch.py $(LAB_ARGS)

exercises: $(STAMP)
	$(PY) -m handson.grading release

autograde: $(STAMP)
	$(PY) -m handson.grading autograde $(if $(FORCE),--force,)

feedback: $(STAMP)
	$(PY) -m handson.grading feedback

report: $(STAMP)
	$(PY) -m handson.grading report

collect: $(STAMP)
	$(PY) -m handson.grading collect $(ASSIGNMENT) $(ZIP)

run: $(STAMP)
	$(PY) -m handson.nbtools run $(NB)

library: $(STAMP)
	$(PY) -m handson.nbtools library

export: $(STAMP)
	$(PY) -m handson.grading export

bench: $(STAMP)
	$(PY) tests/bench_inference.py
	$(PY) tests/bench.py

# Everything CI runs: unit tests, the release check, the solutions, the autograder pipeline with
# the catalog of buggy submissions, nbval over the chapters, and the book build (which must work offline).
test: $(STAMP)
	$(PY) -m handson.nbtools library --check
	@mkdir -p _build
	@echo "make test: nbgrader end to end here; the chapters, the catalog proofs and the unit tests alongside"
	@$(PYTEST) $(NBVAL) book tests $(E2E:%=--ignore=%) > _build/test-chapters.log 2>&1 & chapters=$$!; \
	$(PYTEST) $(E2E); e2e=$$?; \
	wait $$chapters; ch=$$?; \
	echo "---- the chapters, the catalog proofs and the unit tests (_build/test-chapters.log):"; \
	cat _build/test-chapters.log; \
	test $$e2e -eq 0 && test $$ch -eq 0
	$(VENV)/bin/jupyter-book build . --all -W -n --keep-going
	$(PY) tests/check_offline.py _build/html --expect-mathjax
	@if grep -rlE "BEGIN SOLUTION|BEGIN HIDDEN TESTS" _build/html; then \
		echo "the book publishes solutions or hidden tests (files above)"; exit 1; fi
	@echo "make test: all checks passed"

clean:
	rm -rf _build .pytest_cache

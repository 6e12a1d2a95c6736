# Hands-On Transformers. Every target creates .venv from requirements.txt when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# make test runs the test files and the chapters (nbval) on this many workers, one file or notebook per
# worker at a time (--dist loadfile): each heavy session fixture (catalogs, nbgrader runs, hostile
# suite, releases) has a file of its own, so it is built once, on one worker; torch runs one thread
# per process, since the workers already fill the cores.
JOBS ?= 2
# make test stops the test session after this many seconds (it takes about ten minutes on two cores):
# a hang becomes a failure that prints where each worker was (pytest's faulthandler_timeout dumps
# the stack of any test past 20 minutes) instead of a silent wait for an outside limit.
TEST_LIMIT ?= 2700

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
	OMP_NUM_THREADS=1 timeout --signal=INT --kill-after=60 $(TEST_LIMIT) \
		$(PY) -m pytest -q -p no:cacheprovider --durations=15 -n $(JOBS) --dist loadfile \
		--nbval --nbval-current-env --nbval-cell-timeout=300 --nbval-sanitize-with tests/nbval_sanitize.cfg \
		tests book
	$(VENV)/bin/jupyter-book build . --all -W -n --keep-going
	$(PY) tests/check_offline.py _build/html --expect-mathjax
	@if grep -rlE "BEGIN SOLUTION|BEGIN HIDDEN TESTS" _build/html; then \
		echo "the book publishes solutions or hidden tests (files above)"; exit 1; fi
	@echo "make test: all checks passed"

clean:
	rm -rf _build .pytest_cache

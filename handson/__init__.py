"""Helper package of *Hands-On Transformers*.

What a learner's notebook uses:

- :mod:`handson.plot` -- heatmaps of attention weights and masks;
- :mod:`handson.checks` -- assertions with diagnoses, used by the exercises' tests;
- :mod:`handson.data` -- small, generated examples and seeding.

What only the instructor runs:

- :mod:`handson.grading` -- the autograding pipeline around nbgrader, one module per stage
  (course model, releases, repair of submissions, sandboxed execution, autograding, feedback,
  class report, LMS import, command line: ``python -m handson.grading CMD``).

The learner-facing modules, and the book's library of the chapters' code, import nothing from
:mod:`handson.grading`.
"""

__version__ = "0.1.0"

"""Helper package of *Hands-On Transformers*.

- :mod:`handson.plot` -- heatmaps of attention weights and masks;
- :mod:`handson.checks` -- assertions with diagnoses, used by the exercises' tests;
- :mod:`handson.data` -- small, generated examples and seeding;
- :mod:`handson.grading` -- the instructor's autograding pipeline around nbgrader.
"""

__version__ = "0.1.0"

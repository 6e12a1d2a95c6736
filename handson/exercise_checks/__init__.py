"""Checks with diagnoses for the exercises of Parts II and III, one module per assignment.

``handson.checks`` holds the generic comparisons (shapes, closeness, gradients, delegation) and the
Part I blocks; each module here (``handson.exercise_checks.<assignment>``) adds what one exercise's
visible and hidden tests need, built on those generic checks. Like ``handson.checks`` every function
raises :class:`AssertionError` with one sentence that names what is wrong and its likely cause, and
the autograder's integrity probe fingerprints every function of every module in this package.
"""

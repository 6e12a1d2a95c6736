"""Catalogs of plausible buggy submissions, one module per assignment (``BUGS``).

Each bug is a small edit of the solution's answer cell; tests/test_autograde.py autogrades every
one of them and requires it to lose points (in the test cells listed in ``expect``).
"""

"""``python -m handson.grading CMD``: see :mod:`handson.grading.cli`."""

import sys

from handson.grading.cli import main

sys.exit(main())

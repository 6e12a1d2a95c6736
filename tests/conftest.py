import sys
from pathlib import Path

import matplotlib

# Figures drawn by the tests themselves go to no screen. Only this process: the chapters' kernels,
# which may run in the same session (nbval), inherit no MPLBACKEND and keep the inline backend.
matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

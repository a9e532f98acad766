import os
import sys

# Lets tests import the naive reference next to them (tests/naive.py).
sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run under Triton's NumPy interpreter (tests are CPU-only). Triton reads this when
# it is first imported, which importing torch can already do, so it is set before anything else.
os.environ.setdefault("TRITON_INTERPRET", "1")

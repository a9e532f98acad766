import os
import sys

# Lets tests import the naive reference next to them (tests/naive.py).
sys.path.insert(0, os.path.dirname(__file__))

"""python -m benchmarks.stress: the reliability scenarios at full size (see benchmarks/_stress.py)."""

import sys

from benchmarks._stress import main

if __name__ == "__main__":
    sys.exit(main())

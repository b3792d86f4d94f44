"""``python -m benchmark``: see benchmark/cli.py."""

import sys

from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())

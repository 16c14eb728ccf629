"""Prepare a raw dataset: the same as `tunelab prepare` (see `python prepare_data.py --help`).

    python prepare_data.py --input data/raw/my_data.json --format alpaca
"""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))

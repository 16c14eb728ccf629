"""python train.py --config config.yaml  — the brief's entry point; same as `tunelab train`."""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], command_line=True))

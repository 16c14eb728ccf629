"""Merge a fine-tuned adapter into its base model and verify it (same as `tunelab merge`).

    python merge_model.py --adapter outputs/<run>/checkpoint-final --output models/merged [--dtype bf16]
"""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["merge", *sys.argv[1:]]))

"""Chat with a model, or answer prompts (same as `tunelab infer`).

    python inference.py --model models/merged                       # interactive chat
    python inference.py --model models/merged --prompt "Who are you?"
    python inference.py --model bundled:smollm2-135m-instruct --adapter outputs/<run>
"""

import sys

from tunelab.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))

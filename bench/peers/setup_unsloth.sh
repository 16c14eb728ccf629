#!/usr/bin/env bash
# Make Unsloth's own virtual environment for bench/train.py's `unsloth` row (issue 15).
#
#   bash bench/peers/setup_unsloth.sh            # -> $TUNELAB_PEERS_DIR/unsloth (default ~/.cache/tunelab-peers)
#
# Unsloth 2026.10 trains on CPU when torch sees no GPU ("no GPU found, training on CPU ... supported: text LoRA /
# full finetuning with SFTTrainer"). torch 2.13.0 (CPU build) goes in first; torchvision, which pip resolves as a
# build whose operators do not load next to torch 2.13.0+cpu, is removed (Unsloth then skips it; text only).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${TUNELAB_PEERS_DIR:-$HOME/.cache/tunelab-peers}"
venv="$root/unsloth"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
mkdir -p "$root"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" --timeout 10 --retries 0 torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
  || "${pip[@]}" torch==2.13.0
"${pip[@]}" -c "$here/unsloth-constraints.txt" unsloth==2026.10.9 unsloth_zoo==2026.10.9
"$venv/bin/python" -m pip uninstall --yes --quiet torchvision 2>/dev/null || true
"$venv/bin/python" -c "import unsloth; print('unsloth', unsloth.__version__)"
echo "$venv"

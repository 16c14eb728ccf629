#!/usr/bin/env bash
# Make LLaMA-Factory's own virtual environment for bench/train.py's `llamafactory*` rows (issue 15).
#
#   bash bench/peers/setup_llamafactory.sh            # -> $TUNELAB_PEERS_DIR/llamafactory (default ~/.cache/tunelab-peers)
#
# Outside the repository on purpose: it is ~2 GB and not ours. Pinned: torch 2.13.0 (the CPU build, installed
# first so that llamafactory's requirements cannot pull a CUDA one) and bench/peers/llamafactory-constraints.txt.
# torchvision / torchaudio: pip resolves CUDA builds that fail to load next to torch 2.13.0+cpu; text-only SFT needs
# neither, so they are removed and torchaudio is replaced by a stub that raises on use (llamafactory's mm_plugin
# imports it unconditionally).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${TUNELAB_PEERS_DIR:-$HOME/.cache/tunelab-peers}"
venv="$root/llamafactory"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
mkdir -p "$root"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" --timeout 10 --retries 0 torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
  || "${pip[@]}" torch==2.13.0
"${pip[@]}" -c "$here/llamafactory-constraints.txt" llamafactory==0.9.5
"$venv/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio 2>/dev/null || true
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$site/torchaudio"
cat > "$site/torchaudio/__init__.py" <<'PY'
"""Stub (bench/peers/setup_llamafactory.sh): text-only SFT never decodes audio; the real wheel is a CUDA build."""
__version__ = "0.0.0+stub"


def __getattr__(name):
    raise ImportError(f"torchaudio is a stub in this benchmark venv (torchaudio.{name} is not available)")
PY
"$venv/bin/python" -c "import torch, llamafactory; print('llamafactory', llamafactory.__version__, 'torch', torch.__version__)"
echo "$venv"

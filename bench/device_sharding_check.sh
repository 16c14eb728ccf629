#!/usr/bin/env bash
# The check that would lift tunelab's refusal of FSDP and DeepSpeed ZeRO (tunelab.train.distributed).
#
#   bash bench/device_sharding_check.sh            # on a machine with CUDA GPUs; PYTHON=... to pick the interpreter
#
# Needs torch with CUDA, transformers, peft and accelerate installed (no network: the tiny test model is built in
# code); deepspeed too for the ZeRO rows (skipped without it). With 2 or more GPUs it is the full check: each
# sharded config, launched as users launch it, finishes without a hang, saves checkpoint-best and checkpoint-final
# from gathered weights, reports generation metrics, and matches a DDP run's adapter within 1e-5. With one GPU every
# code path runs with a single shard (no cross-process collective), which does not lift the refusal.
# When the full check passes for a config, drop that case from refuse_unverified_sharding and docs/distributed.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
"$PY" - <<'PYEOF'
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("device_sharding_check: no CUDA GPU visible; this check needs one (2+ for the full check)")
n = torch.cuda.device_count()
ds = importlib.util.find_spec("deepspeed") is not None
print(f"device_sharding_check: {n} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"deepspeed {'present' if ds else 'absent (ZeRO rows skipped)'}")
print("full check (2+ GPUs)" if n >= 2 else "one GPU: every path with one shard; the refusal stays")
PYEOF
export HF_HUB_OFFLINE=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pytest tests/device/test_sharding_gpu.py -v -p no:cacheprovider "$@"

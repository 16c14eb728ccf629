"""The two kernel choices of round 4 next to what they replace, in one run (docs/perf-notes.md section 10).

    python bench/kernels.py                 # both parts
    python bench/kernels.py --part attention
    python bench/kernels.py --part decode

attention: forward + backward of one record's causal attention, bf16 (`--dtype fp32` or `bf16,fp32`), 9 query /
3 key-value heads of 64 (SmolLM2's shape), q a strided slice as in a packed row: SDPA's CPU flash kernel against
tunelab's `CausalAttention` (`bmm_attention`), per record length, best of `--repeats` rounds.

decode: one-row bf16 products of the bundled model's shapes with the weights of 30 layers taken in turn (so they
come from memory, not cache, as in a decode step): oneDNN's prepacked product (what batching engines use),
torch's own matrix-vector kernel (`F.linear` with oneDNN switched off: `one_row_gemv`), and a `sum` over the same
bytes (what streaming them costs at least).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_summary  # noqa: E402


def _best_ms(fn, rounds: int, calls: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def attention(lengths: list[int], repeats: int, dtype_name: str = "bf16") -> None:
    import torch
    import torch.nn.functional as F

    from tunelab.model.attention import CausalAttention, causal_bias

    heads, kv_heads, dim = 9, 3, 64
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    print(f"\n{dtype_name}\n\n| record tokens | SDPA flash fwd+bwd ms | CausalAttention fwd+bwd ms | flash / ours |")
    print("| --: | --: | --: | --: |")
    for length in lengths:
        q = torch.randn(1, length + 8, heads, dim, dtype=dtype).transpose(1, 2)[:, :, 4:4 + length]
        q = q.detach().requires_grad_()
        k = torch.randn(1, kv_heads, length, dim, dtype=dtype, requires_grad=True)
        v = torch.randn(1, kv_heads, length, dim, dtype=dtype, requires_grad=True)
        go = torch.randn(1, heads, length, dim, dtype=dtype)
        bias = causal_bias(length, heads // kv_heads, kv_heads, dtype, "cpu")
        flash = _best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                         .backward(go), repeats)
        ours = _best_ms(lambda: CausalAttention.apply(q, k, v, bias, dim ** -0.5).backward(go), repeats)
        print(f"| {length} | {flash:.2f} | {ours:.2f} | {flash / ours:.2f}× |")


def decode(repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    layers = 30
    shapes = {"q/k/v 960 x 576": (960, 576), "o 576 x 576": (576, 576), "gate/up 3072 x 576": (3072, 576),
              "down 576 x 1536": (576, 1536), "lm_head 49152 x 576": (49152, 576)}
    print("\n| product (out x in) | oneDNN packed µs | torch's kernel µs | sum of the bytes µs | packed / torch's |")
    print("| --- | --: | --: | --: | --: |")
    for name, (n, k) in shapes.items():
        count = 2 if n > 10_000 else layers
        weights = [torch.randn(n, k).bfloat16() for _ in range(count)]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        x = torch.randn(1, k).bfloat16()
        op = torch.ops.mkldnn._linear_pointwise

        def each(fn):
            return lambda: [fn(i) for i in range(count)]

        onednn = _best_ms(each(lambda i: op(x, packed[i], None, "none", [], "")), repeats, count) * 1e3
        torch._C._set_mkldnn_enabled(False)
        try:
            native = _best_ms(each(lambda i: F.linear(x, weights[i])), repeats, count) * 1e3
        finally:
            torch._C._set_mkldnn_enabled(True)
        stream = _best_ms(each(lambda i: weights[i].sum()), repeats, count) * 1e3
        print(f"| {name} | {onednn:.0f} | {native:.0f} | {stream:.0f} | {onednn / native:.2f}× |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["attention", "decode", "both"], default="both")
    ap.add_argument("--lengths", default="64,128,256,384,512", help="record lengths for the attention part")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="bf16", help="attention part: bf16, fp32 or both (bf16,fp32)")
    args = ap.parse_args(argv)
    m = machine_summary()
    print(f"{m['cpu']} ({m['cpu_kind']}), {m['torch_threads']} torch threads, torch {m['torch']}, "
          f"load average {m['load_avg'][0]:.1f}")
    if args.part in ("attention", "both"):
        for dtype in args.dtype.split(","):
            attention([int(x) for x in args.lengths.split(",")], args.repeats, dtype)
    if args.part in ("decode", "both"):
        decode(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""2:4 semi-structured sparse linear layers (torch's cuSPARSELt and CUTLASS backends) against dense cuBLAS; CUDA only.

What effopt's `semi_structured` runtime option buys per layer: each row times F.linear(x, W) for a
2:4-pruned fp16 weight, dense, through each sparse backend, and through the layer effopt swaps in
(the faster of dense and cuSPARSELt, timed once per shape), at the kernel bench's shapes and
token counts, timed as bench_kernels.py times its tables (CUDA-graph replays over weight copies
totalling > 3x the 60 MB L2; eager do_bench when a backend cannot be captured, marked "eager").

    python scripts/bench_sparse24.py [--out results.md] [--ms 1,16,128,1024,4096] [--dtype bf16]
"""
import argparse
import sys
import time

import torch

from bench_kernels import LINES, copy_bandwidth, emit, fmt, graph_ms, rotating, table

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from effopt.methods.pruning.masks import nm_mask  # noqa: E402
from effopt.nn import semi_structured as S  # noqa: E402

SHAPES = [(4096, 4096), (8192, 8192), (14336, 4096), (4096, 14336)]
# (column name, force CUTLASS, with the dense fallback): 'effopt layer' is what the runtime option runs
BACKENDS = [("cuSPARSELt", False, False), ("CUTLASS", True, False), ("effopt layer", False, True)]


def two_four(n, k, dtype):
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    return w * nm_mask(w.abs(), 2, 4)  # magnitude 2:4, as the prune stage makes it


def sparse_layers(weights, cutlass, tuned=False):
    """SemiStructuredLinear copies of `weights` on the cuSPARSELt (default) or CUTLASS backend; `tuned`:
    with the dense weight too, as effopt's runtime option builds them (the faster path per shape)."""
    flag = torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        return [S.SemiStructuredLinear(w, None, dense=w if tuned else None) for w in weights]
    finally:
        torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = flag


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--ms", default="1,16,128,1024,4096")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sparse24.py needs a CUDA GPU")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    emit(f"# 2:4 semi-structured sparse linear\n\n{time.strftime('%Y-%m-%d %H:%M')} | {props.name} | torch "
         f"{torch.__version__} | `{' '.join(sys.argv)}`\n\ndevice-to-device copy: {copy_bandwidth():.2f} TB/s")
    rows = []
    for n, k in SHAPES:
        dense = rotating(lambda: two_four(n, k, dtype), n * k * 2)
        backends = {}
        for name, cutlass, tuned in BACKENDS:
            try:
                layers = sparse_layers(dense, cutlass, tuned)
                layers[0](torch.zeros(1, k, device="cuda", dtype=dtype))  # CUTLASS builds on sm_90, runs on sm_8x
                backends[name] = layers
            except Exception as e:  # noqa: BLE001 - a backend this torch build or GPU lacks: say so, go on
                emit(f"{n}x{k} {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
        for m in (int(v) for v in args.ms.split(",")):
            xs = [torch.randn(m, k, device="cuda", dtype=dtype) for _ in range(4)]
            ref = torch.nn.functional.linear(xs[0].float(), dense[0].float())
            t_d, _ = graph_ms([lambda i=i: torch.nn.functional.linear(xs[i % 4], w) for i, w in enumerate(dense)])
            row = [f"{n}x{k}", m, fmt(t_d * 1e3)]
            for name, _, _ in BACKENDS:
                layers = backends.get(name)
                if not layers:
                    row += ["n/a", "n/a", "n/a"]
                    continue
                err = ((layers[0](xs[0]).float() - ref).norm() / ref.norm()).item()
                t_s, how = graph_ms([lambda i=i: layer(xs[i % 4]) for i, layer in enumerate(layers)])
                row += [fmt(t_s * 1e3) + ("" if how == "graph" else " (eager)"), fmt(t_d / t_s, 2), f"{err:.1e}"]
            rows.append(row)
            print("  row:", " | ".join(str(c) for c in row), file=sys.stderr, flush=True)
        dense = backends = None
    table(f"F.linear, {args.dtype}, 2:4 weight [N, K], x [M, K] (speedup = dense µs / sparse µs)",
          ["N x K", "M", "dense cuBLAS µs"] + [h for b in BACKENDS for h in (f"{b[0]} µs", "speedup", "rel err")],
          rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()

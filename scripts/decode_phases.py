"""Where a bf16 decode step's time goes at one cache size (GPU): the whole call, with the merge (PDL 1)
or the merge and the split kernel (PDL 2) as programmatic dependent launches, the split kernel alone
(merge launch skipped), and a kernel that only streams the same K / V bytes.

    python scripts/decode_phases.py [--shapes 8x4096,1x32768] [--cfgs 64,8,4,2,0 64,4,4,2,1]

Times are CUDA-graph replays over cache copies > 3x L2 (bench_kernels.graph_ms), like the decode table.
"""
import argparse
import sys

import torch

from bench_kernels import copy_bandwidth, fmt, graph_ms, read_both, table
from sweep_decode import make_sets, parse_cfg, parse_shape

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from kernels import attention as A  # noqa: E402


class _Skip:
    """Stands in for a kernel whose launch is left out: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="8x4096,1x32768")
    ap.add_argument("--cfgs", nargs="+", default=["64,8,4,2,0", "64,4,4,2,0", "64,2,4,3,0", "64,4,4,2,1"])
    a = ap.parse_args()
    copy_tbs = copy_bandwidth()
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for shape in a.shapes.split(","):
        sets, nbytes = make_sets(*parse_shape(shape), quant=False)  # bf16 (q, K, V) copies past the L2
        sums = torch.empty(8 * sms, device="cuda")
        t_read, _ = graph_ms([lambda x=x: read_both(x[1], x[2], sums) for x in sets])
        pct = lambda t: fmt(100 * nbytes / (t * 1e-3) / 1e12 / copy_tbs, 0)  # noqa: E731 - % of copy bandwidth
        rows.append([shape, "read K and V only", fmt(t_read * 1e3), pct(t_read)])
        for text in a.cfgs:
            cfg = parse_cfg(text)[:6]  # the PDL field is set per row below
            t_all, _ = graph_ms([lambda x=x: A.decode_attention(*x, cfg=cfg) for x in sets])
            rows.append([shape, f"{cfg} whole call", fmt(t_all * 1e3), pct(t_all)])
            if cfg[4]:
                continue
            for mode, what in ((1, "merge as a dependent launch"), (2, "merge and split as dependent launches")):
                pdl = A.decode_cfg_fields(cfg)[:6] + (mode,)
                t_pdl, _ = graph_ms([lambda x=x: A.decode_attention(*x, cfg=pdl) for x in sets])
                rows.append([shape, f"{cfg} whole call, {what} (PDL {mode})", fmt(t_pdl * 1e3), pct(t_pdl)])
            merge = A._decode_merge
            A._decode_merge = _Skip()
            try:
                t_split, _ = graph_ms([lambda x=x: A.decode_attention(*x, cfg=cfg) for x in sets])
            finally:
                A._decode_merge = merge
            rows.append([shape, f"{cfg} split kernel only", fmt(t_split * 1e3), pct(t_split)])
    table(f"decode phases, bf16, 32 query / 8 KV heads, d=128 (copy bandwidth {copy_tbs:.2f} TB/s)",
          ["B x S", "what", "µs", "% of copy BW"], rows)


if __name__ == "__main__":
    main()

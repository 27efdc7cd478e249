"""Every builtin stage, registered explicitly in pipeline order (no discovery, no swallowed errors)."""

from effopt.stages import load, eval, prune, quantize, lowrank, distill, finetune, export  # noqa: F401,A004

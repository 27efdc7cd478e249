"""Imports every builtin effopt module type so that it is registered (explicit list, no discovery)."""

from effopt.nn import adapters, fake_quant, lowrank_linear, masked_linear, quant_linear  # noqa: F401

"""Imports every builtin effopt module type so that it is registered (explicit list, no discovery)."""

from effopt.nn import quant_linear  # noqa: F401

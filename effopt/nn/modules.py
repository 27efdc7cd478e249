"""Imports every builtin effopt module type so that it is registered (explicit list, no discovery)."""

from effopt.nn import (act_quant_linear, adapters, bnb_linear, fake_quant, lowrank_linear,  # noqa: F401
                       masked_linear, quant_linear)

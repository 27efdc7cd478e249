"""effopt's generation: a decode loop over static / quantized / sink KV caches, CUDA-graph replay,
batching where finished sequences leave the batch, and speculative decoding.

    from effopt.generation import generate, speculative_generate, Sampling
"""

from effopt.generation.decode import Generation, generate
from effopt.generation.decoder import Decoder, unsupported_reason
from effopt.generation.sampling import Sampling
from effopt.generation.speculative import SpecResult, speculative_generate

__all__ = ["Decoder", "Generation", "Sampling", "SpecResult", "generate", "speculative_generate", "unsupported_reason"]

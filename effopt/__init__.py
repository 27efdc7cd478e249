"""effopt: compress and adapt Hugging Face causal LMs with YAML recipes, and measure what it bought."""

__version__ = "0.1.0"

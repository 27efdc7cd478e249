"""Low-rank factorization of linear layers: W [out, in] ~ B [out, r] @ A [r, in].

- svd.py: truncated SVD (Eckart-Young) and SVD-LLM's truncation-aware whitened SVD.
- nmf.py: non-negative matrix factorization by Lee & Seung's multiplicative updates.
- rank.py: choosing ranks by parameter ratio, energy kept, or a global parameter budget.
- capture.py: input second moments X X^T of targeted layers, collected decoder layer by layer.
"""

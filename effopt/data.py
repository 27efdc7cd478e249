"""Text sources and token windows: builtin Austen novels (package data) or .txt/.txt.gz/.jsonl files.

`TextData` tokenizes each named source once per run and cuts it into windows: consecutive
non-overlapping windows for evaluation, seeded random windows for calibration and training.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from pathlib import Path

import torch

from effopt.errors import InputError

CHARS_PER_TOKEN_BOUND = 8  # tokenize only a prefix this many chars per budgeted token (then trim)


def read_text(source: str) -> str:
    """The text of a source string (see recipe.TextSource)."""
    if source.startswith("builtin:austen/"):
        name = source.removeprefix("builtin:austen/")
        res = importlib.resources.files("effopt.corpora") / "austen" / f"{name}.txt.gz"
        if not res.is_file():
            raise InputError(f"builtin text {source!r} is missing from the package")
        return gzip.decompress(res.read_bytes()).decode("utf-8")
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"text file {source!r} does not exist")
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{source}:{i}: expected a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")


def default_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts sequences with BOS (Gemma: yes; SmolLM2: no)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


class TextData:
    """Named sources of one run, tokenized lazily with the run's tokenizer."""

    def __init__(self, sources: dict, tokenizer, seed: int):
        self.sources, self.tokenizer, self.seed = sources, tokenizer, seed
        self._tokens: dict[str, torch.Tensor] = {}

    def config(self, name: str):
        """The TextSource config of a named source."""
        if name not in self.sources:
            raise InputError(f"no data source named {name!r} (defined: {', '.join(sorted(self.sources))})")
        return self.sources[name]

    def bos(self, name: str) -> bool:
        """Whether windows of this source start with BOS."""
        cfg = self.config(name)
        return default_bos(self.tokenizer) if cfg.bos is None else cfg.bos

    def tokens(self, name: str) -> torch.Tensor:
        """The first max_tokens tokens of the source, 1-D int64, no special tokens."""
        if name not in self._tokens:
            cfg = self.config(name)
            text = read_text(cfg.source)
            prefix = text[: cfg.max_tokens * CHARS_PER_TOKEN_BOUND]
            ids = self.tokenizer(prefix, add_special_tokens=False).input_ids[: cfg.max_tokens]
            if len(ids) < 2:
                raise InputError(f"data source {name!r} ({cfg.source}) has fewer than 2 tokens")
            self._tokens[name] = torch.tensor(ids, dtype=torch.long)
        return self._tokens[name]

    def _with_bos(self, windows: torch.Tensor, name: str) -> torch.Tensor:
        if not self.bos(name):
            return windows
        bos = torch.full((windows.shape[0], 1), self.tokenizer.bos_token_id, dtype=torch.long)
        return torch.cat([bos, windows], dim=1)

    def windows(self, name: str) -> list[torch.Tensor]:
        """Consecutive non-overlapping windows of seq_len tokens (the last may be shorter), BOS added
        when the source says so. The evaluation protocol (README) is built on these."""
        cfg, ids = self.config(name), self.tokens(name)
        out = [ids[i: i + cfg.seq_len] for i in range(0, len(ids), cfg.seq_len)]
        out = [w for w in out if len(w) >= 2]
        return [self._with_bos(w.unsqueeze(0), name)[0] for w in out]

    def samples(self, name: str, num_samples: int | None = None, seq_len: int | None = None) -> torch.Tensor:
        """`num_samples` windows [n, seq_len] at seeded random offsets (calibration / training)."""
        cfg, ids = self.config(name), self.tokens(name)
        seq_len = seq_len or cfg.seq_len
        n = num_samples or cfg.num_samples or max(1, len(ids) // seq_len)
        if len(ids) < seq_len:
            raise InputError(f"data source {name!r} has {len(ids)} tokens, fewer than seq_len={seq_len}")
        gen = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen)
        windows = torch.stack([ids[s: s + seq_len] for s in starts.tolist()])
        return self._with_bos(windows, name)

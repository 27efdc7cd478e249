"""EAGLE draft heads (Li et al., 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty"): a speculative draft that autoregresses over the target's top-layer features.

The target's feature f_j is the vector its LM head reads at position j (after the final norm).
The draft takes, at position j, the embedding of the token one step ahead, x_{j+1}, next to f_j
(the "shifted token" resolves which of the sampled continuations the feature should follow),
fuses them with one linear layer (2h -> h) and runs one decoder layer of the target's
architecture; its output g_j predicts f_{j+1}, and the target's own (frozen) LM head turns it into
a token distribution. Embeddings and LM head are the target's, shared, not copied.
Training (the paper's objective): smooth-L1 regression of g_j onto f_{j+1} plus 0.1 x the
cross-entropy of the draft's token distribution against the target's (soft labels), with uniform
noise on the input features so the head tolerates its own imperfect features when it rolls out.

The draft is stored as a LlamaForCausalLM-style model of one layer whose final norm is the
identity (`draft_model`), so effopt's Decoder runs it over a KV cache like any model, with the
fused input computed by `EagleHead.fuse`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

META_FILE = "eagle.json"
WEIGHTS_FILE = "eagle.safetensors"


class EagleHead(torch.nn.Module):
    """fc (2h -> h) and a one-layer decoder sharing the target's embeddings and LM head.

    Attributes:
        fc: fuses [embedding of x_{j+1}; f_j].
        draft_model: a one-layer causal LM (same family as the target) with an identity final norm;
            its embed_tokens and lm_head are the target's modules.
    """

    def __init__(self, target: torch.nn.Module):
        super().__init__()
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(target.config)
        cfg.num_hidden_layers = 1
        for key in ("layer_types", "sliding_window"):  # per-layer lists would keep the old length
            if isinstance(getattr(cfg, key, None), list):
                setattr(cfg, key, getattr(cfg, key)[:1])
        param = next(target.parameters())
        self.hidden = cfg.hidden_size
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(cfg)
        # Start as "the next feature is this one" (g_j = f_j): fc passes the feature through and the
        # layer's residual branches write nothing (o_proj, down_proj zero), its other weights copied
        # from the target's top layer. A short training then learns only the change; a random start
        # puts the first predictions far outside the LM head's inputs (our choice; the paper does not
        # say how it initialises).
        self.layer = shell.model.layers[0].to_empty(device=param.device).to(param.dtype)
        self.layer.load_state_dict(target.model.layers[-1].state_dict())
        self.fc = torch.nn.Linear(2 * self.hidden, self.hidden, bias=True, device=param.device, dtype=param.dtype)
        with torch.no_grad():
            eye = torch.eye(self.hidden, device=param.device, dtype=param.dtype)
            self.fc.weight.copy_(torch.cat((torch.zeros_like(eye), eye), dim=1))
            self.fc.bias.zero_()
            self.layer.self_attn.o_proj.weight.zero_()
            self.layer.mlp.down_proj.weight.zero_()
        shell.model.layers[0] = self.layer
        shell.model.norm = torch.nn.Identity()  # g predicts a feature, which is already normalised
        shell.model.embed_tokens, shell.lm_head = target.model.embed_tokens, target.lm_head
        shell.model.rotary_emb = target.model.rotary_emb
        self._draft = [shell]  # outside the module tree: the shared modules belong to the target

    @property
    def draft_model(self) -> torch.nn.Module:
        """The one-layer causal LM the Decoder runs (embeddings and LM head shared with the target)."""
        return self._draft[0]

    def fuse(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """fc([embed(tokens); features]): [B, T] ids (the tokens one step ahead) and [B, T, h] -> [B, T, h]."""
        emb = self.draft_model.model.embed_tokens(tokens).to(features.dtype)
        return self.fc(torch.cat((emb, features), dim=-1))

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Predicted next features g [B, T, h] for a whole sequence (training; causal, no cache)."""
        out = self.draft_model.model(inputs_embeds=self.fuse(tokens, features), use_cache=False)
        return out.last_hidden_state


def target_features(target: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """f [B, S, h]: the target's LM-head inputs (final-norm outputs) at every position."""
    return target.model(input_ids=ids, use_cache=False).last_hidden_state


def eagle_loss(head: EagleHead, lm_head: torch.nn.Module, ids: torch.Tensor, feats: torch.Tensor,
               token_weight: float = 0.1, noise: float = 0.1) -> tuple[torch.Tensor, dict]:
    """The EAGLE objective on one batch; returns (loss, parts).

    Position j pairs f_j (with uniform noise in [-noise, noise]) with token x_{j+1}; the prediction
    g_j is compared with f_{j+1}: smooth-L1 on features, cross-entropy of softmax(lm_head(g_j))
    against softmax(lm_head(f_{j+1})).
    """
    inputs = feats[:, :-2]
    if noise:
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * noise
    pred = head(ids[:, 1:-1], inputs)
    target = feats[:, 1:-1]
    reg = F.smooth_l1_loss(pred.float(), target.float())
    with torch.no_grad():
        p = torch.softmax(lm_head(target).float(), dim=-1)
    logq = torch.log_softmax(lm_head(pred).float(), dim=-1)
    cls = -(p * logq).sum(-1).mean()
    with torch.no_grad():
        top1 = (logq.argmax(-1) == p.argmax(-1)).float().mean()
    parts = {"regression": float(reg.detach()), "classification": float(cls.detach()), "top1": float(top1)}
    return reg + token_weight * cls, parts


class EagleTask(torch.nn.Module):
    """Training task (effopt.training.loop): the head learns from the frozen target's features."""

    def __init__(self, head: EagleHead, target: torch.nn.Module, token_weight: float = 0.1, noise: float = 0.1):
        super().__init__()
        self.head = head
        self._target = [target.eval().requires_grad_(False)]
        self.token_weight, self.noise = token_weight, noise
        self.last: dict = {}

    def _apply(self, fn, *args, **kwargs):
        self._target[0] = self._target[0]._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def forward(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        target = self._target[0]
        with torch.no_grad():
            feats = target_features(target, ids)
        loss, self.last = eagle_loss(self.head, target.lm_head, ids, feats, self.token_weight, self.noise)
        return loss


def save_eagle(head: EagleHead, folder: str | Path, info: dict | None = None) -> Path:
    """Write the head's own weights (fc and its layer; not the shared embeddings) as safetensors,
    and eagle.json (the one-layer config and `info`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"fc.{k}": v for k, v in head.fc.state_dict().items()}
    tensors.update({f"layer.{k}": v for k, v in head.layer.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    meta = {"kind": "eagle", "hidden_size": head.hidden, "model_type": head.draft_model.config.model_type,
            "vocab_size": head.draft_model.config.vocab_size, **(info or {})}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def is_eagle_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by save_eagle."""
    return (Path(path) / META_FILE).is_file()


def load_eagle(folder: str | Path, target: torch.nn.Module) -> EagleHead:
    """The head saved in `folder`, bound to `target` (whose config, embeddings and LM head it uses)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    cfg = target.config
    if meta.get("kind") != "eagle":
        raise ValueError(f"{folder / META_FILE}: 'kind' must be 'eagle', got {meta.get('kind')!r}")
    if meta["hidden_size"] != cfg.hidden_size or meta["vocab_size"] != cfg.vocab_size:
        raise ValueError(f"{folder}: the EAGLE head was trained for hidden size {meta['hidden_size']} and vocabulary "
                         f"{meta['vocab_size']}, the target has {cfg.hidden_size} and {cfg.vocab_size}")
    head = EagleHead(target)
    state = load_file(str(folder / WEIGHTS_FILE))
    dtype = next(target.parameters()).dtype
    head.fc.load_state_dict({k[3:]: v.to(dtype) for k, v in state.items() if k.startswith("fc.")})
    head.layer.load_state_dict({k[6:]: v.to(dtype) for k, v in state.items() if k.startswith("layer.")})
    return head.eval().requires_grad_(False)

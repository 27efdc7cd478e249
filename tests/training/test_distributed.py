"""Two processes (torchrun's agent, gloo on CPU; DDP, or FSDP2 sharding) compute what one process
computes, while also writing mid-stage training checkpoints.

Tolerance: parameters agree within 2e-5 absolute after 3 AdamW steps at lr 1e-3 (each step moves a
weight by up to ~1e-3): gradients are averaged in another order, nothing else differs.
"""

from __future__ import annotations

import pytest
import torch

from effopt.training.distributed import run_job, set_nproc
from effopt.training.loop import TrainEnv
from tests.conftest import tiny_llama

TOL = 2e-5


@pytest.mark.parametrize("stage,method,job,strategy", [
    ("finetune", "full", "effopt.stages.finetune:finetune_job", "ddp"),
    pytest.param("finetune", "lora", "effopt.stages.finetune:finetune_job", "fsdp", marks=pytest.mark.slow),
    pytest.param("distill", "features", "effopt.stages.distill:distill_job", "ddp", marks=pytest.mark.slow),
])
def test_two_gloo_processes_match_one(tmp_path, stage, method, job, strategy):
    from effopt.registry import spec_of

    cls = next(c for c in spec_of(stage).configs if c.model_fields["method"].default == method)
    batches = {"input_ids": torch.randint(3, 259, (12, 32), generator=torch.Generator().manual_seed(0))}
    states, runs = [], []
    for nproc in (1, 2):
        cfg = cls(steps=3, batch_size=4, seq_len=32, lr=1e-3, checkpoint_every=2,
                  distributed={"nproc": nproc, "strategy": strategy if nproc > 1 else "ddp"})
        teacher = tiny_llama(seed=7) if stage == "distill" else None
        model, metrics = run_job(job, cfg, tiny_llama(), teacher, batches,
                                 TrainEnv(seed=0, state_dir=tmp_path / f"state{nproc}"))
        states.append(model.state_dict())
        runs.append(metrics)
    assert runs[1]["processes"] == 2 and runs[0]["processes"] == 1
    moved = max((states[0][k] - tiny_llama().state_dict()[k]).abs().max().item() for k in states[0])
    diff = max((states[0][k] - states[1][k]).abs().max().item() for k in states[0])
    assert moved > 50 * TOL and diff < TOL, (moved, diff)
    assert abs(runs[0]["train_loss_last"] - runs[1]["train_loss_last"]) < 1e-4


def test_set_nproc_revalidates_the_batch_split(tmp_path):
    from effopt.errors import InputError
    from effopt.recipe import parse_recipe

    raw = {"name": "n", "stages": [{"stage": "load"}, {"stage": "finetune", "method": "lora", "batch_size": 4},
                                   {"stage": "eval"}]}
    recipe = parse_recipe(raw)
    assert set_nproc(recipe, 2) == 1 and recipe.stages[1].distributed.nproc == 2
    with pytest.raises(InputError, match="multiple"):
        set_nproc(recipe, 3)

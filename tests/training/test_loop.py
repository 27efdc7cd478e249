"""The shared training loop on tiny in-code tasks: accumulation, precision, loss scaling, optimizers,
schedules, gradient checkpointing, checkpoint + resume mid-stage."""

from __future__ import annotations

import pytest
import torch

from effopt.training.loop import TrainEnv, batch_rows, train
from effopt.training.options import TrainOptions
from effopt.training.tasks import CausalLMTask
from tests.conftest import tiny_llama


class Regression(torch.nn.Module):
    """Least squares: loss = mean((x w - y)^2); a batch row is [x..., y]."""

    def __init__(self, dim: int = 8, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, generator=gen))  # not zero: Adafactor's steps are relative

    def forward(self, batch: dict) -> torch.Tensor:
        rows = batch["rows"]  # elementwise ops: autocast leaves them in float32
        return (((rows[:, :-1] * self.w).sum(-1) - rows[:, -1]) ** 2).mean()


def regression_batches(steps: int, batch: int, dim: int = 8, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch, dim, generator=gen)
    target = torch.linspace(-1, 1, dim)
    return {"rows": torch.cat([x, (x @ target)[:, None]], dim=1)}


def opts(**kw) -> TrainOptions:
    base = dict(steps=4, batch_size=4, seq_len=8, lr=0.05, schedule="constant", max_grad_norm=None, log_every=100)
    return TrainOptions(**{**base, **kw})


def test_batch_rows_split_by_rank_and_micro_step():
    batches = {"rows": torch.arange(16)[:, None]}
    o = opts(batch_size=8, grad_accum=2)
    rank1 = batch_rows(batches, 1, o, TrainEnv(rank=1, world=2))
    assert [c["rows"].flatten().tolist() for c in rank1] == [[12, 13], [14, 15]]


def test_gradient_accumulation_matches_one_big_batch():
    results = []
    for accum in (1, 2, 4):
        task = Regression()
        train(task, regression_batches(4, 4), opts(optimizer="sgd", grad_accum=accum))
        results.append(task.w.detach().clone())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,steps,lr,min_drop", [
    ("adamw", 60, 0.05, 0.9), ("adafactor", 60, 0.05, 0.75), ("lion", 60, 0.05, 0.9),
    ("adamw8bit", 60, 0.05, 0.9), ("sgd", 60, 0.05, 0.9), ("mezo", 300, 0.02, 0.9),
])
def test_every_optimizer_reduces_the_loss(name, steps, lr, min_drop):
    task = Regression(dim=8)
    batches = regression_batches(steps, 4)
    with torch.no_grad():
        before = task(batches).item()
    train(task, batches, opts(optimizer=name, steps=steps, lr=lr))
    with torch.no_grad():
        after = task(batches).item()
    assert after < (1 - min_drop) * before, (before, after)


def test_mezo_keeps_no_gradients():
    task = Regression()
    train(task, regression_batches(5, 4), opts(optimizer="mezo", steps=5, lr=0.01))
    assert task.w.grad is None


def test_mezo_step_follows_the_projected_gradient():
    """With eps small the MeZO update is -lr * (z . grad) z for its own z (Malladi et al. eq. 2)."""
    from effopt.training.mezo import MeZO

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    target = torch.randn(6, dtype=torch.float64)
    opt = MeZO([w], lr=0.1, eps=1e-6, seed=3)
    before, seed = w.detach().clone(), opt._step_seed()
    opt.step(lambda: ((w - target) ** 2).sum())
    z = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    grad = 2 * (before - target)
    torch.testing.assert_close(w.detach(), before - 0.1 * (z @ grad) * z, atol=1e-6, rtol=0)


class InfOnce(Regression):
    """Regression whose loss is inf-scaled at optimizer step `bad` (one batch row flagged)."""

    def forward(self, batch):
        loss = super().forward(batch)
        return loss * batch["scale"].max()


def test_fp16_loss_scaling_skips_inf_steps():
    steps, bad = 4, 2
    batches = regression_batches(steps, 4)
    scale = torch.ones(steps * 4, 1)
    scale[bad * 4] = float("inf")
    batches["scale"] = scale
    task = InfOnce()
    seen = []
    original = task.forward

    def record(batch):
        seen.append(task.w.detach().clone())
        return original(batch)

    task.forward = record
    metrics = train(task, batches, opts(precision="fp16", optimizer="sgd", steps=steps))
    assert metrics["skipped_steps"] == 1
    torch.testing.assert_close(seen[bad + 1], seen[bad], atol=0, rtol=0)  # the inf step left w alone
    assert not torch.equal(seen[bad], seen[bad - 1])  # normal steps do update
    assert torch.isfinite(task.w).all()


def test_fp16_overflow_lowers_the_scale_and_keeps_weights_finite():
    model = tiny_llama()
    metrics = train(CausalLMTask(model), lm_batches(6, 2), opts(steps=6, batch_size=2, precision="fp16", lr=1e-3))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert metrics["skipped_steps"] < 6 and metrics["train_loss_last"] < 6


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp32", torch.float32)])
def test_autocast_runs_matmuls_in_the_requested_dtype(precision, dtype):
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, batch):
            out = self.lin(batch["rows"][:, :4])
            seen.append(out.dtype)
            return out.float().pow(2).mean()

    task = Probe()
    train(task, {"rows": torch.randn(8, 5)}, opts(steps=2, precision=precision))
    assert seen == [dtype, dtype] and task.lin.weight.dtype == torch.float32


@pytest.mark.parametrize("schedule,at_step,expected", [
    ("constant", [1, 2, 4, 10], [0.25, 0.5, 1.0, 1.0]),
    ("linear", [4, 7, 10], [1.0, 0.5, 0.0]),
    ("cosine", [4, 7, 10], [1.0, 0.5, 0.0]),
])
def test_lr_schedule_with_warmup(schedule, at_step, expected):
    from effopt.training.optim import build_optimizer, build_scheduler

    o = opts(steps=10, warmup_steps=4, schedule=schedule, lr=1.0)
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], o)
    sched = build_scheduler(opt, o)
    lrs = {}
    for step in range(1, 11):
        opt.step()
        sched.step()
        lrs[step] = sched.get_last_lr()[0]
    assert [round(lrs[s], 6) for s in at_step] == expected


def lm_batches(steps: int, batch: int, seq: int = 16) -> dict:
    return {"input_ids": torch.randint(3, 259, (steps * batch, seq), generator=torch.Generator().manual_seed(0))}


def test_gradient_checkpointing_gives_the_same_gradients():
    from effopt.training.loop import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        CausalLMTask(model)(lm_batches(1, 2)).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "mezo"])
def test_resume_mid_stage_matches_an_uninterrupted_run(tmp_path, optimizer):
    o = opts(steps=6, optimizer=optimizer, checkpoint_every=2, lr=0.01, schedule="cosine", warmup_steps=1)
    batches = regression_batches(6, 4)
    full = Regression()
    ref = train(full, batches, o, TrainEnv(state_dir=tmp_path / "a"), digest="x")
    broken = Regression()
    with pytest.raises(KeyboardInterrupt):
        train(broken, batches, o, TrainEnv(state_dir=tmp_path / "b"), digest="x", stop_after=3)
    resumed = Regression()  # a fresh process: starts from the stage's input again
    got = train(resumed, batches, o, TrainEnv(state_dir=tmp_path / "b"), digest="x")
    torch.testing.assert_close(resumed.w, full.w, atol=0, rtol=0)
    assert got["train_loss_last"] == ref["train_loss_last"]


def test_state_of_another_config_is_not_resumed(tmp_path):
    batches = regression_batches(4, 4)
    with pytest.raises(KeyboardInterrupt):
        train(Regression(), batches, opts(steps=4, checkpoint_every=1, lr=0.01), TrainEnv(state_dir=tmp_path),
              digest="a", stop_after=2)
    other, fresh = Regression(), Regression()
    train(other, batches, opts(steps=4, checkpoint_every=1, lr=0.02), TrainEnv(state_dir=tmp_path), digest="b")
    train(fresh, batches, opts(steps=4, lr=0.02))
    torch.testing.assert_close(other.w, fresh.w, atol=0, rtol=0)


def test_batch_must_split_over_processes_and_micro_steps():
    with pytest.raises(ValueError, match="multiple"):
        TrainOptions(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="multiple"):
        TrainOptions(batch_size=4, grad_accum=1, distributed={"nproc": 3})

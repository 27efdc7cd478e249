"""EAGLE draft heads: greedy speculative output identical to plain greedy, the sampled path, the
training objective, save/load, and the distill stage's eagle method end to end."""

from __future__ import annotations

import pytest
import torch
from gen_models import lively_llama, prompt

from effopt.generation import Sampling, generate
from effopt.generation.eagle import eagle_generate
from effopt.methods.distill.eagle import EagleHead, EagleTask, eagle_loss, load_eagle, save_eagle, target_features


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _scrambled_head(target, seed: int = 0) -> EagleHead:
    """A head whose fc mixes token and feature at random (an untrained head would only pass f_j on)."""
    head = EagleHead(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.fc.weight.add_(torch.randn(head.fc.weight.shape, generator=gen, dtype=head.fc.weight.dtype) * 0.2)
    return head


@pytest.mark.parametrize("k,cache", [(1, "bf16"), (3, "bf16"), (5, "int8"), (4, "int4")])
def test_greedy_eagle_equals_plain_greedy(k, cache):
    """float64 (no near-tie flips between 1-token and (k+1)-token passes); every round, including
    the device-side acceptance and the draft's catch-up over junk slots, must keep the target's tokens."""
    target = lively_llama(seed=0).double()
    head = _scrambled_head(target)
    seen, accepted = set(), 0
    for seed, n in ((0, 1), (1, 9), (2, 40), (3, 33)):
        ids = prompt(5 + 3 * seed, seed)
        plain = generate(target, [ids], n, cache=cache).tokens[0]
        spec = eagle_generate(target, head, ids, n, k=k, cache=cache)
        assert spec.tokens == plain
        assert spec.round_tokens == spec.accepted + spec.target_calls and spec.proposed == k * spec.target_calls
        seen.update(plain)
        accepted += spec.accepted
    assert len(seen) > 8 and accepted > 0


def test_sampled_eagle_is_reproducible():
    target = lively_llama()
    head = _scrambled_head(target, 1)
    hot = Sampling(temperature=1.0)
    a = eagle_generate(target, head, prompt(5, 7), 25, k=3, sampling=hot, seed=11)
    b = eagle_generate(target, head, prompt(5, 7), 25, k=3, sampling=hot, seed=11)
    assert a.tokens == b.tokens and len(a.tokens) == 25
    assert 0 < a.acceptance_rate <= 1


def test_eagle_stops_at_eos():
    target = lively_llama().double()
    ids = prompt(6, 4)
    plain = generate(target, [ids], 20).tokens[0]
    spec = eagle_generate(target, _scrambled_head(target), ids, 20, k=3, eos_token_id=plain[6])
    assert spec.tokens == plain[: plain.index(plain[6]) + 1]


def test_training_lowers_the_eagle_loss_on_held_out_text():
    """The paper's objective, trained on the target's own samples, falls on other samples."""
    from effopt.training.loop import train
    from effopt.training.options import TrainOptions

    target = lively_llama(seed=0, gain=2.0)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)  # peaked next-token distributions, as a trained model has
    samples = generate(target, [prompt(4, s) for s in range(400)], 36, sampling=Sampling(temperature=1.0), seed=0)
    ids = torch.tensor([prompt(4, s) + samples.tokens[s] for s in range(400)])
    train_ids, held_out = ids[:368], ids[368:]
    head = EagleHead(target)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(eagle_loss(head, target.lm_head, held_out, target_features(target, held_out), noise=0)[0])

    before = held_out_loss()
    opts = TrainOptions(steps=60, batch_size=16, seq_len=40, lr=1e-2, warmup_steps=5, log_every=1000)
    train(EagleTask(head, target), {"input_ids": train_ids.repeat(3, 1)[:960]}, opts)
    after = held_out_loss()
    assert after < 0.95 * before, (before, after)
    assert all(not p.requires_grad for p in target.parameters())


def test_save_and_load_keep_the_head(tmp_path):
    target = lively_llama()
    head = _scrambled_head(target, 3)
    save_eagle(head, tmp_path / "draft", {"steps": 1})
    loaded = load_eagle(tmp_path / "draft", target)
    ids = torch.tensor([prompt(9, 2)])
    with torch.no_grad():
        feats = target_features(target, ids)
        assert torch.equal(head(ids[:, 1:], feats[:, :-1]), loaded(ids[:, 1:], feats[:, :-1]))
    assert loaded.draft_model.lm_head is target.lm_head
    other = lively_llama(hidden=32, heads=2, kv_heads=1, intermediate=64)
    with pytest.raises(ValueError, match="hidden size"):
        load_eagle(tmp_path / "draft", other)


def test_distill_stage_eagle_method_writes_a_head_bench_can_load(tmp_path, tiny_model_dir):
    from effopt.bench import load_draft
    from effopt.models import load_model
    from tests.stages.training_helpers import TRAIN, run, tiny_recipe

    stages = [{"stage": "distill", "method": "eagle", **TRAIN, "lr": 1e-3}]
    record = run(tiny_recipe(tiny_model_dir, stages), tmp_path / "run")
    metrics = record["stages"][1]["metrics"]
    assert record["status"] == "completed" and metrics["draft_path"] == "draft"
    assert metrics["train_loss_first"] > 0 and metrics["draft_parameters"] > 0
    target = load_model(str(tiny_model_dir), device="cpu")[0]
    head = load_draft(str(tmp_path / "run"), target)
    assert isinstance(head, EagleHead)
    ids = prompt(6, 1)
    assert eagle_generate(target, head, ids, 8, k=2).tokens == generate(target, [ids], 8).tokens[0]


@pytest.mark.parametrize("output", ["../elsewhere", "/tmp/x", ""])
def test_eagle_output_must_stay_inside_the_run(output):
    from effopt.stages.distill import EagleConfig

    with pytest.raises(ValueError, match="inside the run directory"):
        EagleConfig(output=output)

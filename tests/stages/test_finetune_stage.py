"""The finetune stage through the runner on the tiny model: every method runs, leaves a checkpoint
the runner can reload with the same outputs, keeps masks, resumes mid-stage, and (marked real) on
the builtin SmolLM2."""

from __future__ import annotations

import pytest
import torch

from tests.stages.training_helpers import TRAIN, run, tiny_recipe

METHODS = [
    ({"method": "lora", "r": 4}, {"merged": 14}),
    ({"method": "qlora", "base": "int", "group_size": 32, "init": "loftq"}, {"kept_on_quantized": 14}),
    ({"method": "qlora", "base": "nf4", "targets": ["*.q_proj"]}, {"kept_on_quantized": 2}),
    ({"method": "adapter", "bottleneck": 8}, {}),
    ({"method": "adapter", "bottleneck": 8, "placement": "parallel"}, {}),
    ({"method": "prompt_tuning", "num_virtual_tokens": 4}, {}),
    ({"method": "prefix_tuning", "num_virtual_tokens": 4}, {}),
    ({"method": "full", "optimizer": "adamw8bit"}, {}),
    ({"method": "full", "optimizer": "mezo", "lr": 1e-4}, {}),
    ({"method": "qat", "bits": 4, "group_size": 32}, {"quantized_layers": 14}),
]


@pytest.mark.parametrize("options,expect", METHODS, ids=[f"{o['method']}-{i}" for i, (o, _) in enumerate(METHODS)])
def test_every_method_runs_and_checkpoints(tmp_path, tiny_model_dir, options, expect):
    from effopt.models import load_checkpoint

    raw = tiny_recipe(tiny_model_dir, [{"stage": "finetune", **TRAIN, **options}])
    record = run(raw, tmp_path / "run")
    assert record["status"] == "completed"
    metrics = record["stages"][1]["metrics"]
    assert metrics["trainable_params"] > 0 and metrics["train_steps"] == 4
    for key, value in expect.items():
        assert metrics[key] == value, (key, metrics)
    if options["method"] in ("prompt_tuning", "prefix_tuning"):
        assert (tmp_path / "run" / "adapters" / f"01-{options['method']}" / "adapter_config.json").is_file()
        assert metrics["adapter_perplexity"] > 1
    assert not (tmp_path / "run" / "train_state").exists()  # training state dropped once the stage completed
    model, _ = load_checkpoint(tmp_path / "run" / record["stages"][1]["checkpoint"])  # the runner reloads it
    assert record["stages"][2]["metrics"]["perplexity"] > 1 and model.config.vocab_size == 259


@pytest.mark.parametrize("quantize", [{"method": "rtn", "bits": 4, "group_size": 32},
                                      {"method": "bnb", "quant_type": "nf4", "double_quant": True}])
def test_qlora_over_quantized_base_writes_a_peft_adapter(tmp_path, tiny_model_dir, quantize):
    stages = [{"stage": "quantize", **quantize}, {"stage": "finetune", "method": "qlora", "r": 4, **TRAIN}]
    record = run(tiny_recipe(tiny_model_dir, stages), tmp_path / "run")
    metrics = record["stages"][2]["metrics"]
    assert metrics["kept_on_quantized"] == 14
    assert (tmp_path / "run" / "adapters" / "02-qlora" / "adapter_model.safetensors").is_file()


def test_pruned_weights_stay_zero_through_full_finetuning(tmp_path, tiny_model_dir):
    from effopt.models import load_checkpoint

    stages = [{"stage": "prune", "method": "magnitude", "pattern": "2:4"},
              {"stage": "finetune", "method": "full", **TRAIN, "lr": 1e-2},
              {"stage": "finetune", "method": "lora", **TRAIN, "lr": 1e-2}]
    record = run(tiny_recipe(tiny_model_dir, stages), tmp_path / "run")
    for index in (2, 3):
        model, _ = load_checkpoint(tmp_path / "run" / record["stages"][index]["checkpoint"])
        layer = model.model.layers[0].mlp.up_proj
        assert torch.count_nonzero(layer.weight[~layer.weight_mask]) == 0
        assert (layer.weight_mask.view(-1, 4).sum(-1) == 2).all()
    assert abs(record["stages"][4]["metrics"]["sparsity"] - 0.5) < 0.01


def test_killed_mid_stage_resumes_to_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    import effopt.training.loop as loop
    from effopt.models import load_checkpoint

    stage = {"stage": "finetune", "method": "lora", **TRAIN, "steps": 6, "checkpoint_every": 2}
    raw = tiny_recipe(tiny_model_dir, [stage])
    clean = run(raw, tmp_path / "clean")
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **k: real_train(*a, **k, stop_after=3))
    with pytest.raises(KeyboardInterrupt):
        run(raw, tmp_path / "killed")
    assert (tmp_path / "killed" / "train_state" / "01" / "state.pt").is_file()
    monkeypatch.setattr(loop, "train", real_train)
    resumed = run(raw, tmp_path / "killed", resume=True)
    assert resumed["stages"][1]["metrics"]["train_loss_last"] == clean["stages"][1]["metrics"]["train_loss_last"]
    a = load_checkpoint(tmp_path / "clean" / "checkpoints" / "01-finetune")[0].state_dict()
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "01-finetune")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_nproc_must_split_the_batch(tmp_path, tiny_model_dir):
    import yaml
    from typer.testing import CliRunner

    from effopt.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, [{"stage": "finetune", "method": "lora", **TRAIN}])))
    result = CliRunner().invoke(app, ["run", "--quiet", str(path), "-o", str(tmp_path / "o"), "--nproc", "3"])
    assert result.exit_code == 2 and "multiple" in result.output


@pytest.mark.real
def test_lora_on_the_real_model(tmp_path):
    stages = [{"stage": "finetune", "method": "lora", "r": 4, "steps": 2, "batch_size": 1, "seq_len": 64,
               "targets": ["*.q_proj", "*.v_proj"]}]
    raw = tiny_recipe("builtin:smollm2-135m", stages, "real-lora")
    raw["stages"][0]["source"] = "builtin:smollm2-135m"
    raw["data"]["eval"] = {"source": "builtin:austen/persuasion", "max_tokens": 512, "seq_len": 256}
    record = run(raw, tmp_path / "run")
    metrics = record["stages"][1]["metrics"]
    assert metrics["merged"] == 60 and metrics["trainable_params"] == 30 * 4 * (576 + 576 + 576 + 192)
    assert 1.5 < metrics["train_loss_first"] < 6 and 10 < record["stages"][2]["metrics"]["perplexity"] < 80

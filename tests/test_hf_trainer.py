"""transformers' `Trainer` trains our model as it trains its own (transformers 5 has no ViT Hybrid, but its
Trainer takes any module whose forward gives a loss): the loss it reports is our model's, its
gradient-checkpointing switch reaches our layers, `load_best_model_at_end` restores the best epoch, and its
weights-only checkpoints load with `vf.load(dir, config=model.config)`."""

from __future__ import annotations

import math

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import tiny_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own requirement (a test extra)


class Noise(torch.utils.data.Dataset):
    def __init__(self, size: int, offset: int = 0) -> None:
        self.size, self.offset = size, offset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        generator = torch.Generator().manual_seed(self.offset + i)
        return {"pixel_values": torch.randn(3, 72, 72, generator=generator), "labels": i % 7}


def test_the_trainer_trains_evaluates_and_checkpoints_our_model(tmp_path):
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config()))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = transformers.TrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=4, num_train_epochs=2,
        learning_rate=1e-3, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="loss", gradient_checkpointing=True, use_cpu=True, report_to=[], seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    evaluation = Noise(8, offset=100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Noise(16), eval_dataset=evaluation)
    result = trainer.train()
    assert model.is_gradient_checkpointing and math.isfinite(result.training_loss)
    assert any(not torch.equal(start[k], v) for k, v in model.state_dict().items())

    metrics = trainer.evaluate()
    rows = [evaluation[i] for i in range(len(evaluation))]
    batches = [torch.utils.data.default_collate(rows[i : i + 4]) for i in (0, 4)]
    with torch.no_grad():
        model.eval()
        losses = [model(batch["pixel_values"], labels=batch["labels"]).loss for batch in batches]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)

    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith(("checkpoint-4", "checkpoint-8"))
    loaded = vf.load(best, config=model.config, kernels="eager")  # the Trainer wrote model.safetensors alone
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, tensor in model.state_dict().items():  # load_best_model_at_end put that epoch's weights back
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_predictions_with_label_smoothing_are_the_logits(tmp_path):
    """With label_smoothing_factor the Trainer takes the labels out and reads the logits from the outputs:
    as a dict (ModelOutput's kind) by name; a tuple-like output lost them (`outputs[1:]` was empty)."""
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()
    args = transformers.TrainingArguments(str(tmp_path), label_smoothing_factor=0.1, use_cpu=True, report_to=[],
                                          per_device_eval_batch_size=4, disable_tqdm=True)  # fmt: skip
    data = Noise(8)
    predicted = transformers.Trainer(model=model, args=args).predict(data)
    with torch.no_grad():
        logits = model(torch.stack([data[i]["pixel_values"] for i in range(8)])).logits
    assert predicted.predictions.shape == (8, 7)
    torch.testing.assert_close(torch.from_numpy(predicted.predictions), logits, rtol=1e-5, atol=1e-5)

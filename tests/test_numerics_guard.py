"""The numerics guard of JointSSL: a step whose loss or gradient is not finite never reaches the weights (skipped
and counted), too many in a row stop the run with a message naming the loss term and the batch's samples, and the
collapse alarm warns when the prototype usage or assignment entropy falls below its threshold."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from jointssl.callbacks.numerics_guard import NonFiniteTrainingError
from jointssl.pretrain import JointSSL
from tests.test_pretrain import TINY_MODEL, fit, tiny_data


class PoisonBatches(Callback):
    """Makes the 2D crops of chosen steps NaN (what a corrupt input or an fp16 overflow would do) and records the
    weights after every step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.weights: list[torch.Tensor] = []
        self.momentum: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            batch["images"]["crops"][0][0] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        weight = pl_module.encoder.proj.weight
        self.weights.append(weight.detach().clone())
        state = trainer.optimizers[0].state.get(weight, {})
        self.momentum.append(state.get("momentum_buffer", torch.zeros(())).clone())


def model(**overrides) -> JointSSL:
    kwargs = dict(TINY_MODEL, method="swav", num_prototypes=[10], freeze_prototypes_steps=0, warmup_epochs=0)
    kwargs.update(overrides)
    return JointSSL(**kwargs)


def test_a_non_finite_loss_step_is_skipped_and_counted(tmp_path: Path, caplog) -> None:
    poison = PoisonBatches({2})
    net = model()
    with caplog.at_level(logging.WARNING, logger="jointssl"):
        trainer = fit(net, tiny_data(tmp_path), tmp_path, max_steps=5, callbacks=[poison])
    assert trainer.global_step == 5  # a skipped step still counts (schedule and max_steps move on)
    # The batch after step 2's weights: identical weights and momentum across the poisoned batch.
    assert torch.equal(poison.weights[2], poison.weights[1])
    assert torch.equal(poison.momentum[2], poison.momentum[1])
    assert not torch.equal(poison.weights[3], poison.weights[2])  # and training went on
    assert all(torch.isfinite(p).all() for p in net.parameters())
    # The NaN batch's statistics did not reach BatchNorm's running averages either.
    assert all(torch.isfinite(b).all() for b in net.buffers() if b.is_floating_point())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert "non-finite loss term(s) L_intra at global step 2" in caplog.text
    # The batch's samples, their source and the files behind them.
    assert "images index [" in caplog.text and "from images" in caplog.text and ".png" in caplog.text


def test_consecutive_bad_steps_stop_the_run_naming_term_and_samples(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteTrainingError) as error:
        fit(model(max_consecutive_bad_steps=3), tiny_data(tmp_path), tmp_path, max_steps=8,
            callbacks=[PoisonBatches({1, 2, 3, 4, 5})])
    message = str(error.value)
    assert "3 consecutive non-finite steps" in message and "L_intra" in message
    assert "images index [" in message


def test_a_non_finite_gradient_step_is_skipped(tmp_path: Path, caplog) -> None:
    net = model()
    weight = net.encoder.proj.weight
    poisoned_step = {"step": 1}
    trainer_ref = {}

    class Capture(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            trainer_ref["trainer"] = trainer

    # Infinite gradient at one step only; the loss itself stays finite.
    weight.register_hook(
        lambda grad: grad * float("inf") if trainer_ref["trainer"].global_step == poisoned_step["step"] else grad
    )
    record = PoisonBatches(set())
    with caplog.at_level(logging.WARNING, logger="jointssl"):
        trainer = fit(net, tiny_data(tmp_path), tmp_path, max_steps=3, callbacks=[Capture(), record])
    assert "non-finite gradient of encoder.proj.weight" in caplog.text
    assert torch.equal(record.weights[1], record.weights[0])
    assert torch.equal(record.momentum[1], record.momentum[0])
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0


def test_collapse_alarm_warns_and_metrics_are_logged(tmp_path: Path, caplog) -> None:
    # Thresholds no 10-prototype run can meet: the alarm must fire, and the metrics are there either way.
    net = model(collapse_min_prototypes_used=1.01, collapse_min_entropy=1.01)
    with caplog.at_level(logging.WARNING, logger="jointssl"):
        trainer = fit(net, tiny_data(tmp_path), tmp_path, max_epochs=1)
    metrics = trainer.callback_metrics
    for name in ("prototypes_used", "assignment_entropy", "largest_cluster_fraction"):
        assert 0.0 <= float(metrics[f"train/intra_{name}"]) <= 1.0
    assert "collapse alarm (intra, epoch 0)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jointssl"):
        fit(model(collapse_min_prototypes_used=0.0, collapse_min_entropy=0.0), tiny_data(tmp_path), tmp_path,
            max_epochs=1)
    assert "collapse alarm" not in caplog.text


def test_samples_are_described_by_their_files(tmp_path: Path) -> None:
    from jointssl.data import SyntheticData

    data = tiny_data(tmp_path, synthetic=SyntheticData(root=str(tmp_path), num_images=8, image_size=40,
                                                       num_volumes=2, volume_shape=[40, 40, 6]),
                     num_slices=4, volume_size=32, volume_batch_size=2, slice_stride=2)
    data.prepare_data()
    data.setup("fit")
    first_image = data.describe_sample(data.image_index_range[0])
    assert first_image == data.image_records[0].path and first_image.endswith(".png")
    slices = data.slice_index_range
    volume = data.volume_records[0].path
    # Every 2nd of 6 slices, centred: slices 0, 2, 4 of the first volume come first.
    assert [data.describe_sample(i) for i in slices[:3]] == [f"{volume} slice {k}" for k in (0, 2, 4)]
    assert data.describe_sample(data.volume_index_range[1]) == data.volume_records[1].path
    assert "not in this data module" in data.describe_sample(data.num_samples)

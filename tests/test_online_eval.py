"""Online kNN evaluation during pretraining: the weighted vote against a hand-worked example, label discovery,
the logged metric equal to a recomputation, and 2 gloo ranks equal to one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jointssl.callbacks.online_eval import OnlineKNNEvaluation, labelled_records
from jointssl.evaluation.probes import weighted_knn_predict
from jointssl.pretrain import JointSSL
from tests.gloo_ranks import run_ranks
from tests.online_eval_worker import evaluate
from tests.test_pretrain import TINY_MODEL, fit, tiny_data


def write_two_classes(root: Path, per_class: int = 24) -> Path:
    """Bright discs vs horizontal stripes, 40 px grey PNGs in ImageFolder layout."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :40]
    for name in ("disc", "stripes"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if name == "disc":
                cy, cx, r = rng.integers(12, 28), rng.integers(12, 28), rng.integers(5, 10)
                image = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * 200.0
            else:
                image = ((yy // rng.integers(2, 5)) % 2) * 200.0
            image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{name}_{i:02d}.png")
    return root


def test_weighted_vote_matches_a_hand_worked_example() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.3, 1.0]])
    # k=3, T=0.07: query 0's neighbours are rows 0 and 1 (class 0, cosine 0.999 and 0.998) and row 4 (class 1,
    # 0.291): weights e^14.3 twice against e^4.2, class 0. Query 1 lies among the class-1 rows.
    # k=5 with a flat temperature (T=1000, every weight ~1): three class-1 votes beat two class-0 votes.
    assert weighted_knn_predict(bank, labels, queries, 2, k=3, temperature=0.07).tolist() == [0, 1]
    assert weighted_knn_predict(bank, labels, queries, 2, k=5, temperature=1e3).tolist() == [1, 1]


def test_labels_come_from_subfolders_and_manifests(tmp_path: Path) -> None:
    root = write_two_classes(tmp_path / "folder", per_class=2)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(root / "unlabelled.png")  # directly under the root
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label\n{root / 'disc' / 'disc_00.png'},tumour\n{root / 'stripes' / 'stripes_00.png'},\n")
    found = labelled_records([str(root), str(manifest)])
    labels = sorted(label for _, label in found)
    assert labels == ["disc", "disc", "stripes", "stripes", "tumour"]  # the unlabelled ones are left out


def test_logged_accuracy_equals_a_recomputation(tmp_path: Path) -> None:
    images = write_two_classes(tmp_path / "labelled")
    callback = OnlineKNNEvaluation(images=[str(images)], image_size=32, k=5, query_fraction=0.3)
    model = JointSSL(**TINY_MODEL, method="swav", num_prototypes=[10], warmup_epochs=0)
    trainer = fit(model, tiny_data(tmp_path / "data"), tmp_path, max_epochs=1, callbacks=[callback])
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("online_eval/")}
    assert set(logged) == {"online_eval/knn_top1", "online_eval/knn_balanced_accuracy"}
    assert logged == pytest.approx(callback.evaluate(model.encoder, torch.device("cpu")))
    assert callback.classes == ["disc", "stripes"]
    # Discs and stripes are far apart even for a barely trained encoder: well above chance (0.5).
    assert logged["online_eval/knn_top1"] >= 0.8


def test_rejects_a_single_class(tmp_path: Path) -> None:
    root = write_two_classes(tmp_path / "x", per_class=3)
    callback = OnlineKNNEvaluation(images=[str(root / "disc")])  # the class folder itself: no sub-folders
    with pytest.raises(ValueError, match="at least 2 classes"):
        callback.setup(None, None, "fit")


def test_linear_probe_online_is_the_shared_probe(tmp_path: Path) -> None:
    """probes=[knn, linear]: both sets of metrics, each equal to the shared probes on the callback's embeddings."""
    from jointssl.evaluation import probes
    from jointssl.models import SliceEncoder

    images = write_two_classes(tmp_path / "labelled", per_class=12)
    callback = OnlineKNNEvaluation(images=[str(images)], image_size=32, k=5, query_fraction=0.3,
                                   probes=["knn", "linear"], probe_weight_decay=1e-3)
    callback.setup(None, None, "fit")
    torch.manual_seed(0)
    encoder = SliceEncoder("test_resnet", d_model=16)
    metrics = callback.evaluate(encoder, torch.device("cpu"))
    assert set(metrics) == {"online_eval/knn_top1", "online_eval/knn_balanced_accuracy",
                            "online_eval/linear_top1", "online_eval/linear_balanced_accuracy"}
    embeddings, labels, query = callback.embed(encoder, torch.device("cpu")), callback._labels, callback._is_query
    linear = probes.linear_probe(embeddings[~query], labels[~query], embeddings[query], 2, weight_decay=1e-3)
    knn = probes.knn_probe(embeddings[~query], labels[~query], embeddings[query], 2, k=5, temperature=0.07)
    assert metrics["online_eval/linear_top1"] == probes.accuracy(linear.predicted, labels[query])
    assert metrics["online_eval/linear_balanced_accuracy"] == probes.balanced_accuracy(linear.predicted, labels[query])
    assert metrics["online_eval/knn_top1"] == probes.accuracy(knn.predicted, labels[query])
    only_linear = OnlineKNNEvaluation(images=[str(images)], image_size=32, query_fraction=0.3, probes=["linear"])
    only_linear.setup(None, None, "fit")
    assert set(only_linear.evaluate(encoder, torch.device("cpu"))) == {
        "online_eval/linear_top1", "online_eval/linear_balanced_accuracy"}
    with pytest.raises(ValueError, match="probes must be"):
        OnlineKNNEvaluation(images=[str(images)], probes=["svm"])


@pytest.mark.ddp
def test_two_ranks_compute_what_one_process_does(tmp_path: Path) -> None:
    write_two_classes(tmp_path / "images")
    ranks = run_ranks("tests.online_eval_worker", tmp_path, world_size=2)
    single = evaluate(str(tmp_path / "images"))
    for result in ranks:
        assert {k: float(v) for k, v in result.items()} == pytest.approx(single)

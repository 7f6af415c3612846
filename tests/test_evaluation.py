"""`jointssl embed` / `jointssl evaluate` and the shared probes: kNN and the linear probe against independent
references, the grouped split and label regex, the commands end to end on synthetic images and volumes (and on
the real 2D slices when present), every documented JSON field, and bad input as a one-line error with exit 2."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jointssl.cli import main
from jointssl.data.synthetic import SyntheticData, generate_synthetic_images, generate_synthetic_volumes
from jointssl.evaluation import probes
from jointssl.evaluation.features import write_embedding
from jointssl.evaluation.protocol import REPORT_FIELDS, evaluate, grouped_split, item_groups
from tests.conftest import REPO_ROOT, shared_path

DOCS = REPO_ROOT / "docs" / "evaluation.md"


# ----------------------------------------------------------------------------------------------------------------
# Probes against independent references


def test_knn_votes_match_a_hand_worked_example() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[2.0, 0.5]])  # scale does not matter: cosine similarity
    k, temperature = 3, 0.5
    # By hand: cosines of (2, 0.5)/|.| with the bank rows; the 3 nearest are rows 0, 2, 1 (row 3 points away).
    unit = np.array([2.0, 0.5]) / math.hypot(2.0, 0.5)
    cosines = [unit @ (np.array(row) / np.linalg.norm(row)) for row in bank.tolist()]
    nearest = sorted(range(4), key=lambda i: -cosines[i])[:k]
    assert sorted(nearest) == [0, 1, 2]
    weight = {c: sum(math.exp(cosines[i] / temperature) for i in nearest if labels[i] == c) for c in (0, 1)}
    # Class 1 has two neighbours (rows 1 and 2), class 0 the closest one (row 0): e^(0.970/0.5) = 6.96 against
    # e^(0.857/0.5) + e^(0.243/0.5) = 5.55 + 1.63 = 7.18: two weaker votes win.
    assert weight[1] > weight[0]
    result = probes.knn_probe(bank, labels, query, 2, k=k, temperature=temperature)
    assert result.predicted.tolist() == [1]
    expected = torch.tensor([[weight[0], weight[1]]]) / (weight[0] + weight[1])
    assert torch.allclose(result.scores, expected.float(), atol=1e-6)
    # A sharper temperature lets the single closest neighbour win.
    assert probes.knn_probe(bank, labels, query, 2, k=k, temperature=0.05).predicted.tolist() == [0]
    # A tiny temperature does not overflow (weights are taken relative to the closest neighbour).
    sharp = probes.knn_probe(bank, labels, query, 2, k=k, temperature=1e-4)
    assert torch.isfinite(sharp.scores).all() and sharp.predicted.tolist() == [0]


def two_gaussians(n: int, distance: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points per class in 4-d, class means 'distance' apart along the first axis, unit variance."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n)
    points = rng.normal(size=(2 * n, 4))
    points[:, 0] += labels * distance
    return torch.tensor(points), torch.tensor(labels)


def test_linear_probe_separates_two_gaussians() -> None:
    x_train, y_train = two_gaussians(30, distance=10.0, seed=0)
    x_test, y_test = two_gaussians(20, distance=10.0, seed=1)
    result = probes.linear_probe(x_train, y_train, x_test, 2)
    assert probes.accuracy(result.predicted, y_test) == 1.0
    assert probes.balanced_accuracy(result.predicted, y_test) == 1.0
    assert probes.binary_auroc(result.scores[:, 1], y_test) == 1.0
    assert (result.scores.gather(1, y_test[:, None]) > 0.99).all()
    assert torch.allclose(result.scores.sum(dim=1), torch.ones(40, dtype=torch.float64))
    # Deterministic: the same inputs give the same probabilities, bit for bit.
    assert torch.equal(probes.linear_probe(x_train, y_train, x_test, 2).scores, result.scores)


def numpy_logistic_regression(x: np.ndarray, y: np.ndarray, classes: int, weight_decay: float) -> tuple:
    """Plain gradient descent to convergence on mean cross-entropy + weight_decay * sum(W**2) (no bias penalty)."""
    onehot = np.eye(classes)[y]
    weight, bias = np.zeros((classes, x.shape[1])), np.zeros(classes)
    for _ in range(100_000):
        logits = x @ weight.T + bias
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad_w = (p - onehot).T @ x / len(x) + 2 * weight_decay * weight
        grad_b = (p - onehot).mean(axis=0)
        if math.sqrt((grad_w**2).sum() + (grad_b**2).sum()) < 1e-12:
            return weight, bias
        weight -= grad_w
        bias -= grad_b
    raise AssertionError("reference gradient descent did not converge")


def test_linear_probe_equals_plain_gradient_descent() -> None:
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.5], [0.0, 1.5, -0.5]])  # overlapping: a finite optimum
    y_train, y_test = np.repeat(np.arange(3), 20), np.repeat(np.arange(3), 5)
    x_train = means[y_train] * 3 + 10 + rng.normal(size=(60, 3)) * [1.0, 2.0, 3.0]  # unscaled, off-centre
    x_test = means[y_test] * 3 + 10 + rng.normal(size=(15, 3)) * [1.0, 2.0, 3.0]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    weight, bias = numpy_logistic_regression((x_train - mean) / std, y_train, 3, weight_decay=1e-2)
    logits = (x_test - mean) / std @ weight.T + bias
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    result = probes.linear_probe(torch.tensor(x_train).float(), torch.tensor(y_train), torch.tensor(x_test).float(),
                                 3, weight_decay=1e-2)
    # float32 inputs: the probe computes in float64, so only the inputs' rounding separates it from the reference.
    np.testing.assert_allclose(result.scores.numpy(), expected, atol=1e-5)
    assert result.predicted.tolist() == expected.argmax(axis=1).tolist()


def test_metrics_on_known_answers() -> None:
    truth = torch.tensor([0, 0, 0, 1])
    always_zero = torch.tensor([0, 0, 0, 0])
    assert probes.accuracy(always_zero, truth) == 0.75
    assert probes.balanced_accuracy(always_zero, truth) == 0.5  # recall 1 for class 0, 0 for class 1
    # The classic example: one of the four positive/negative pairs is ranked wrongly.
    assert probes.binary_auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert probes.binary_auroc(torch.tensor([0.1, 0.4]), torch.tensor([1, 1])) is None


# ----------------------------------------------------------------------------------------------------------------
# Protocol on hand-made embedding folders (no model)


def write_folder(folder: Path, paths: list[str], labels: list[str], features: torch.Tensor, **meta) -> Path:
    """An embedding folder as `jointssl embed` writes it, from given features."""
    embed_meta = {"format": "jointssl-embeddings", "version": 1, "kind": "images", "checkpoint": "/x.ckpt",
                  "checkpoint_sha256": "0" * 64, "random_init": False, "seed": 0, "num_items": len(paths),
                  "features": {"features": features.shape[1]}, "jointssl_version": "test", **meta}
    write_embedding(folder, {"features": features}, paths, labels, embed_meta)
    return folder


def clustered(paths: list[str], labels: list[str], seed: int = 0) -> torch.Tensor:
    """One well-separated cluster per label."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    centres = rng.normal(size=(len(names), 8)) * 10
    return torch.tensor(np.stack([centres[names.index(label)] + rng.normal(size=8) for label in labels]))


def test_grouped_split_never_puts_a_group_on_both_sides() -> None:
    paths = [f"/data/patient{p:02d}/slice{s}.png" for p in range(12) for s in range(1 + p % 4)]
    paths += ["/data/loose_a.png", "/data/loose_b.png"]  # no match: each its own group
    groups = item_groups(paths, r"/(patient\d+)/")
    assert groups.count("path:/data/loose_a.png") == 1 and len(set(groups)) == 14
    for seed in range(20):
        train, test = grouped_split(groups, test_fraction=0.3, seed=seed)
        assert sorted(train + test) == list(range(len(paths)))
        assert not {groups[i] for i in train} & {groups[i] for i in test}
        assert abs(len(test) - 0.3 * len(paths)) <= 4  # groups of up to 4 items
    assert grouped_split(groups, 0.3, seed=3) == grouped_split(groups, 0.3, seed=3)
    assert grouped_split(groups, 0.3, seed=3) != grouped_split(groups, 0.3, seed=4)


def test_label_regex_drops_and_counts_unmatched_items(tmp_path: Path) -> None:
    paths = [f"/d/{name}_{i:02d}_p{i % 5}.png" for name in ("cat", "dog") for i in range(15)]
    paths += [f"/d/other_{i}.png" for i in range(4)]
    labels = [re.match(r"/d/([a-z]+)_", p).group(1) for p in paths]
    folder = write_folder(tmp_path / "emb", paths, [""] * len(paths), clustered(paths, labels))
    report = evaluate(folder, label_regex=r"/(cat|dog)_", group_regex=r"_p(\d)\.png$", seed=1)
    assert report["dropped_unlabelled"] == 4
    assert report["n_train"] + report["n_test"] == 30
    assert report["classes"] == ["cat", "dog"] and report["split"] == "grouped"
    assert report["n_groups_train"] + report["n_groups_test"] == 5
    assert report["knn_acc"] == 1.0 and report["linear_acc"] == 1.0 and report["auroc_linear"] == 1.0
    with pytest.raises(ValueError, match="matches none"):
        evaluate(folder, label_regex=r"/(bird)_")


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    paths = [f"/d/{c}/{i}.png" for c in ("a", "b") for i in range(6)]
    labels = [p.split("/")[2] for p in paths]
    features = clustered(paths, labels)
    both = write_folder(tmp_path / "both", paths, labels, features)
    one_class = write_folder(tmp_path / "one", paths[:6], labels[:6], features[:6])
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(one_class)
    # The same files in train and test.
    with pytest.raises(ValueError, match="share 12 group"):
        evaluate(both, both)
    # Other files, but the same patients.
    other = write_folder(tmp_path / "other", [p.replace(".png", "_b.png") for p in paths], labels, features)
    with pytest.raises(ValueError, match="share 2 group"):
        evaluate(both, other, group_regex=r"/d/(a|b)/")
    third = write_folder(tmp_path / "third", ["/e/c/0.png", "/e/a/1.png"], ["c", "a"], features[:2])
    with pytest.raises(ValueError, match=r"\['c'\] have no train item"):
        evaluate(both, third)
    random_weights = write_folder(tmp_path / "random", ["/e/a/1.png"], ["a"], features[:1], random_init=True)
    with pytest.raises(ValueError, match="not comparable"):
        evaluate(both, random_weights)
    with pytest.raises(ValueError, match="no feature 'volume'"):
        evaluate(both, feature="volume")


# ----------------------------------------------------------------------------------------------------------------
# The commands end to end


def documented_fields(heading: str) -> list[str]:
    """The field names of the table under the docs/evaluation.md section whose heading starts with `heading`."""
    text = DOCS.read_text()
    start = text.index(heading)
    section = text[start:text.index("\n## ", start + 1) if "\n## " in text[start + 1:] else len(text)]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images (4 classes, 32 px) and two sets of 8 volumes (4 classes) of the synthetic generator."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_images(SyntheticData(root=str(root / "a"), num_images=16, image_size=32))
    for name, seed in (("a", 0), ("b", 1)):
        generate_synthetic_volumes(SyntheticData(root=str(root / name), num_images=0, num_volumes=8,
                                                 volume_shape=(24, 24, 6), seed=seed))
    return root


def run_cli(args: list[str]) -> None:
    main([str(a) for a in args])


def test_documented_fields_and_code_agree() -> None:
    assert documented_fields("## `jointssl evaluate`") == list(REPORT_FIELDS)
    assert "checkpoint_sha256" in documented_fields("## `jointssl embed`")


def test_embed_then_evaluate_images(tmp_path: Path, pretrained_checkpoint: Path, synthetic: Path, capsys) -> None:
    images = synthetic / "a" / "images"
    run_cli(["embed", "--pretrained", pretrained_checkpoint, "--images", images, "--output", tmp_path / "emb",
             "--image-size", 32, "--batch-size", 5, "--quiet"])
    meta = json.loads((tmp_path / "emb" / "embed.json").read_text())
    documented = documented_fields("## `jointssl embed`")
    assert set(meta) == set(documented) - {"volume_size", "slice_stride"}
    assert meta["kind"] == "images" and meta["num_items"] == 16 and meta["features"] == {"features": 32}
    assert meta["random_init"] is False and meta["image_size"] == 32
    assert meta["checkpoint_sha256"] == hashlib.sha256(pretrained_checkpoint.read_bytes()).hexdigest()
    with open(tmp_path / "emb" / "items.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["index"] for row in rows] == [str(i) for i in range(16)]
    assert {row["label"] for row in rows} == {"large_discs", "small_discs", "noisy_discs", "shaded_discs"}
    features = load_file(str(tmp_path / "emb" / "features.safetensors"))["features"]
    assert features.shape == (16, 32) and features.dtype == torch.float32

    # Batching does not change the features: one image alone through the loaded encoder gives its row.
    from jointssl.downstream.pretrained import load_pretrained
    from jointssl.data.prediction_inputs import preprocess_image
    encoder = load_pretrained(pretrained_checkpoint).slice_encoder().eval()
    with torch.no_grad():
        alone = encoder(preprocess_image(rows[3]["path"], 32)[None])[0]
    assert torch.allclose(alone, features[3], atol=1e-5)

    # An export folder gives the same features; its hash is that of its encoders.safetensors.
    run_cli(["export", "--checkpoint", pretrained_checkpoint, "--output", tmp_path / "export"])
    run_cli(["embed", "--pretrained", tmp_path / "export", "--images", images, "--output", tmp_path / "from_export",
             "--image-size", 32, "--quiet"])
    assert torch.allclose(load_file(str(tmp_path / "from_export" / "features.safetensors"))["features"], features,
                          atol=1e-6)
    exported = json.loads((tmp_path / "from_export" / "embed.json").read_text())["checkpoint_sha256"]
    assert exported == hashlib.sha256((tmp_path / "export" / "encoders.safetensors").read_bytes()).hexdigest()

    capsys.readouterr()
    report_path = tmp_path / "out" / "report.json"
    # Synthetic file names are <class>_<NNNN>.png: group by the number, so each group holds one image per class.
    run_cli(["evaluate", "--train", tmp_path / "emb", "--group-regex", r"_(\d{4})\.png$", "--k", 5,
             "--report", report_path, "--task", "synthetic"])
    printed = capsys.readouterr().out
    assert "kNN acc" in printed and "linear acc" in printed and "synthetic" in printed
    report = json.loads(report_path.read_text())
    assert list(report) == documented_fields("## `jointssl evaluate`")
    assert report["split"] == "grouped" and report["n_groups_train"] + report["n_groups_test"] == 4
    assert report["n_train"] + report["n_test"] == 16 and report["n_test"] % 4 == 0
    assert report["auroc_knn"] is None and report["auroc_linear"] is None  # 4 classes
    assert report["checkpoint_sha256"] == meta["checkpoint_sha256"] and report["random_init"] is False
    for name in ("knn_acc", "knn_balanced_acc", "linear_acc", "linear_balanced_acc"):
        assert 0.0 <= report[name] <= 1.0

    # The random-init baseline: same architecture, weights from the seed (reproducible, unlike the checkpoint's).
    for name, seed in (("random0", 0), ("random0_again", 0), ("random1", 1)):
        run_cli(["embed", "--pretrained", pretrained_checkpoint, "--random-init", "--seed", seed, "--images", images,
                 "--output", tmp_path / name, "--image-size", 32, "--quiet"])
    random0, again, random1 = (load_file(str(tmp_path / n / "features.safetensors"))["features"]
                               for n in ("random0", "random0_again", "random1"))
    assert torch.equal(random0, again)
    assert not torch.allclose(random0, random1) and not torch.allclose(random0, features)
    assert json.loads((tmp_path / "random0" / "embed.json").read_text())["random_init"] is True
    run_cli(["evaluate", "--train", tmp_path / "random0", "--group-regex", r"_(\d{4})\.png$", "--k", 5,
             "--report", tmp_path / "random.json"])
    random_report = json.loads((tmp_path / "random.json").read_text())
    assert random_report["random_init"] is True and list(random_report) == list(report)
    assert random_report["n_test"] == report["n_test"]  # the same split for the same data and seed


def test_embed_then_evaluate_volumes_two_sources(tmp_path: Path, pretrained_checkpoint: Path, synthetic: Path) -> None:
    for name in ("a", "b"):
        run_cli(["embed", "--pretrained", pretrained_checkpoint, "--volumes", synthetic / name / "volumes",
                 "--output", tmp_path / name, "--volume-size", 16, "--slice-stride", 2, "--batch-size", 2, "--quiet"])
    meta = json.loads((tmp_path / "a" / "embed.json").read_text())
    assert set(meta) == set(documented_fields("## `jointssl embed`")) - {"image_size"}
    assert meta["kind"] == "volumes" and meta["num_items"] == 8
    assert meta["features"] == {"volume": 32, "slice_mean": 32} and meta["slice_stride"] == 2
    tensors = load_file(str(tmp_path / "a" / "features.safetensors"))
    # f_inter's volume feature is L2-normalised; the slice mean is not.
    assert torch.allclose(tensors["volume"].norm(dim=1), torch.ones(8), atol=1e-5)
    assert not torch.allclose(tensors["volume"], tensors["slice_mean"])

    # The volume feature of one volume recomputed by hand: f_intra on every 2nd slice, then f_inter and its pool.
    from jointssl.data.discovery import discover_volumes
    from jointssl.downstream.pretrained import load_pretrained
    from jointssl.evaluation.inputs import preprocess_volume
    weights = load_pretrained(pretrained_checkpoint)
    encoder, aggregator = weights.slice_encoder().eval(), weights.slice_aggregator().eval()
    record = discover_volumes([synthetic / "a" / "volumes"])[0]
    with torch.no_grad():
        slices = preprocess_volume(record, 16, slice_stride=2)
        assert slices.shape == (3, 1, 16, 16)
        z = encoder(slices)
        assert torch.allclose(aggregator.pool(aggregator(z[None]))[0], tensors["volume"][0], atol=1e-5)
        assert torch.allclose(z.mean(dim=0), tensors["slice_mean"][0], atol=1e-5)

    for feature in ("volume", "slice_mean"):
        report_path = tmp_path / f"{feature}.json"
        run_cli(["evaluate", "--train", tmp_path / "a", "--test", tmp_path / "b", "--feature", feature, "--k", 3,
                 "--label-regex", r"/(ct|mr)_", "--report", report_path])
        report = json.loads(report_path.read_text())
        assert list(report) == list(REPORT_FIELDS)
        assert report["split"] == "two_sources" and report["feature"] == feature
        assert report["n_train"] == 8 and report["n_test"] == 8 and report["classes"] == ["ct", "mr"]
        assert report["auroc_knn"] is not None and report["auroc_linear"] is not None  # binary task
        assert report["test_fraction"] is None and report["dropped_unlabelled"] == 0


def test_volume_labels_come_from_the_manifest_column_or_the_class_folder(tmp_path: Path) -> None:
    from jointssl.evaluation.inputs import volumes_with_labels

    for name in ("flair/p1.nii.gz", "flair/p2.nii.gz", "t1/p3.nii.gz"):  # discovery decodes nothing
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    manifest = tmp_path / "volumes.csv"
    manifest.write_text("path,modality,label\nflair/p1.nii.gz,MR,FLAIR\nt1/p3.nii.gz,,\n")
    from_manifest = volumes_with_labels([str(manifest)])
    assert [(Path(r.path).name, r.modality, label) for r, label in from_manifest] == [
        ("p1.nii.gz", "mr", "FLAIR"), ("p3.nii.gz", None, None)]
    from_folder = volumes_with_labels([str(tmp_path)])
    assert [(Path(r.path).name, label) for r, label in from_folder] == [
        ("p1.nii.gz", "flair"), ("p2.nii.gz", "flair"), ("p3.nii.gz", "t1")]


@pytest.mark.shared_data
def test_embed_then_evaluate_real_slices(tmp_path: Path, pretrained_checkpoint: Path) -> None:
    """The 4 datasets of the real 2D slices, 20 slices per class at 32 px, split by scan (file name before
    _frame_), for the pretrained encoder and its random init."""
    root = shared_path("slices2d")
    manifest = tmp_path / "slices.csv"
    with open(manifest, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label"])
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for path in sorted(folder.glob("*.png"))[:20]:
                writer.writerow([path, folder.name])
    reports = {}
    for name, extra in (("pretrained", []), ("random", ["--random-init"])):
        run_cli(["embed", "--pretrained", pretrained_checkpoint, *extra, "--images", manifest, "--output",
                 tmp_path / name, "--image-size", 32, "--quiet"])
        run_cli(["evaluate", "--train", tmp_path / name, "--group-regex", r"([^/]+)_frame_\d+\.png$",
                 "--report", tmp_path / f"{name}.json"])
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for report in reports.values():
        assert report["n_train"] + report["n_test"] == 80 and len(report["classes"]) == 4
        assert report["split"] == "grouped" and report["n_groups_test"] >= 1
        # Brain MR, lung CT, liver CT and heart MR differ at a glance: far above chance (0.25) even for random
        # weights.
        assert report["knn_acc"] > 0.5 and report["linear_acc"] > 0.5
    assert reports["random"]["n_test"] == reports["pretrained"]["n_test"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2


def expect_exit_2(args: list, capsys, message: str) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert re.search(message, error), error


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, pretrained_checkpoint: Path, synthetic: Path,
                                          capsys) -> None:
    images = synthetic / "a" / "images"
    expect_exit_2(["embed", "--pretrained", tmp_path / "missing.ckpt", "--images", images, "--output", tmp_path / "x"],
                  capsys, r"^jointssl embed: error: .*missing\.ckpt: pretrained weights not found")
    (tmp_path / "empty").mkdir()
    expect_exit_2(["embed", "--pretrained", pretrained_checkpoint, "--images", tmp_path / "empty", "--output",
                   tmp_path / "x"], capsys, r"^jointssl embed: error: .*empty: no usable 2D images: the folder holds no files")
    expect_exit_2(["embed", "--pretrained", pretrained_checkpoint, "--images", tmp_path / "nowhere", "--output",
                   tmp_path / "x"], capsys, r"^jointssl embed: error: image source does not exist")
    expect_exit_2(["evaluate", "--train", tmp_path / "empty"], capsys,
                  r"^jointssl evaluate: error: .*not an embedding folder")
    run_cli(["embed", "--pretrained", pretrained_checkpoint, "--images", images, "--output", tmp_path / "emb",
             "--image-size", 16, "--quiet"])
    expect_exit_2(["embed", "--pretrained", pretrained_checkpoint, "--images", images, "--output", tmp_path / "emb"],
                  capsys, r"already holds .*--overwrite")
    expect_exit_2(["evaluate", "--train", tmp_path / "emb", "--label-regex", r"/(zebra)_"], capsys,
                  r"^jointssl evaluate: error: label regex '/\(zebra\)_' matches none of the 16 item paths")
    expect_exit_2(["evaluate", "--train", tmp_path / "emb", "--group-regex", "(unclosed"], capsys,
                  r"group regex '\(unclosed' is not a regular expression")

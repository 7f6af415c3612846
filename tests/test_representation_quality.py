"""benchmarks/representation_quality.py: the split logic on a tiny fake data tree (fast), and the whole chain
prepare -> pretrain joint_swav -> evaluate -> table with --smoke on the real reference data (slow)."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, shared_path

SCRIPT = REPO_ROOT / "benchmarks" / "representation_quality.py"


def load_script():
    spec = importlib.util.spec_from_file_location("representation_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rq = load_script()


def image(path: Path, value: int | None = None) -> None:
    """A tiny grey image; value None = random content (distinct bytes), 0 = all black."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = np.full((8, 8), value, np.uint8) if value is not None else rng.integers(1, 255, (8, 8), np.uint8)
    Image.fromarray(pixels).save(path)


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    # Chest X-rays: several images per patient, and the same patients again in pretrain/cxr. IM-7 and NORMAL2-IM-7
    # are different patients.
    for n in range(1, 11):
        for k in (1, 2):
            image(root / "cxr/train/NORMAL" / f"IM-{n:04d}-{k:04d}.jpeg")
            image(root / "cxr/train/PNEUMONIA" / f"person{n}_bacteria_{10 * n + k}.jpeg")
        image(root / "cxr/train/NORMAL" / f"NORMAL2-IM-{n:04d}-0001.jpeg")
        image(root / "pretrain/cxr/NORMAL" / f"IM-{n:04d}-0003-0001.jpeg")
        image(root / "pretrain/cxr/PNEUMONIA" / f"person{n}_virus_{100 + n}.jpeg")
        image(root / "pretrain/cxr/PNEUMONIA" / f"person{100 + n}_virus_{200 + n}.jpeg")  # not in cxr/train
    # Brain MRI (no patients) with one byte-identical copy under another name.
    for label, code in (("glioma", "gl"), ("meningioma", "me"), ("notumor", "no"), ("pituitary", "pi")):
        for n in range(30):
            image(root / "pretrain/brain_mri" / label / f"Tr-{code}_{n:04d}.jpg")
    copy = root / "pretrain/brain_mri/glioma/Tr-gl_9999.jpg"
    copy.write_bytes((root / "pretrain/brain_mri/glioma/Tr-gl_0000.jpg").read_bytes())
    # slices2d: BraTS patients with several sequences, other datasets by scan id; some all-black BraTS slices.
    for p in range(10):
        for sequence in ("t1", "t1ce", "t2", "flair"):
            image(root / "slices2d/BraTS2018_Brain" / f"Brats18_TCIA0{p}_{100 + p}_1_{sequence}_frame_{p + 10:03d}.png")
        image(root / "slices2d/BraTS2018_Brain" / f"Brats18_2013_{p}_1_t2_frame_000.png", value=0)
        for frame in (1, 2):
            image(root / "slices2d/LUNA2016_Lung" / f"1.3.6.1.{p}_frame_{frame:03d}.png")
            image(root / "slices2d/LiTS2017_Liver" / f"volume-{p}_frame_{frame:03d}.png")
            image(root / "slices2d/MSD_Heart" / f"la_{p:03d}_frame_{frame}.png")
    # Volumes (empty files: prepare only reads names).
    for name in ("ct/example_ct.nii.gz", "ct/example_ct_sm.nii.gz", "mr/example_mr_sm.nii.gz"):
        touch(root / "volumes" / name)
    pairs = ["image,label,modality,shape"]
    for patient, dates in (("PGBM-001", ("1991-11-19", "1992-04-02")), ("PGBM-003", ("1995-03-29", "1995-10-17"))):
        for date in dates:
            for sequence in ("FLAIR", "T1post"):
                stem = f"{patient}_{date}_{sequence}"
                touch(root / "volumes/mr" / f"{stem}.nii.gz")
                touch(root / "volumes/labels" / f"{stem}_tumor.nii.gz")
                pairs.append(f"mr/{stem}.nii.gz,labels/{stem}_tumor.nii.gz,MR,1x1x1")
    pairs.append("ct/example_ct.nii.gz,,CT,1x1x1")
    (root / "volumes/pairs.csv").write_text("\n".join(pairs) + "\n")
    for patient in ("PGBM-004", "PGBM-005", "PGBM-009"):
        for sequence in ("FLAIR", "T1post", "T1pre", "T2"):
            touch(root / "pretrain/volumes/mr" / f"{patient}_1990-01-01_{sequence}.nii.gz")
    touch(root / "pretrain/volumes/mr/KneeMR_sag_pd.nii.gz")
    touch(root / "pretrain/volumes/ct/JohnDoe_CT_series.nii.gz")
    return root


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_split_rules(fake_tree: Path) -> None:
    splits = rq.build_splits(fake_tree)
    rq.check_splits(splits)
    tasks = splits["tasks"]
    pretrain = {r["path"] for r in splits["pretrain_images"]}
    # CXR: whole patients on one side; every image of a test patient (both folders) out of pretraining.
    test_patients = {rq.cxr_patient(r["path"]) for r in tasks["cxr_pneumonia"]["test"]}
    train_patients = {rq.cxr_patient(r["path"]) for r in tasks["cxr_pneumonia"]["train"]}
    assert test_patients and train_patients and not test_patients & train_patients
    assert all(r["path"].startswith("cxr/train/") for r in tasks["cxr_pneumonia"]["test"] + tasks["cxr_pneumonia"]["train"])
    for r in splits["pretrain_images"]:
        if r["source"] == "cxr":
            assert rq.cxr_patient(r["path"]) not in test_patients
    assert any(p.startswith("pretrain/cxr/PNEUMONIA/person10") for p in pretrain)  # patients only in pretrain stay
    assert rq.cxr_patient("cxr/train/NORMAL/IM-0007-0001.jpeg") != rq.cxr_patient(
        "cxr/train/NORMAL/NORMAL2-IM-0007-0001.jpeg")
    assert rq.cxr_patient("pretrain/cxr/NORMAL/IM-0007-0003-0001.jpeg") == "NORMAL/IM-7"
    # Brain MRI: held-out files out of pretraining; byte-identical copies on the same side.
    brain_test = {r["path"] for r in tasks["brain_tumour_class"]["test"]}
    assert brain_test and not brain_test & pretrain
    assert {r["path"] for r in tasks["brain_tumour_class"]["train"]} <= pretrain
    copies = {"pretrain/brain_mri/glioma/Tr-gl_0000.jpg", "pretrain/brain_mri/glioma/Tr-gl_9999.jpg"}
    assert copies <= brain_test or not copies & brain_test
    # slices2d: scans (BraTS: patients) on one side only; every dataset on both sides.
    for name in ("slices2d_dataset", "brats_sequence"):
        train = {rq.slices2d_group(r["path"]) for r in tasks[name]["train"]}
        test = {rq.slices2d_group(r["path"]) for r in tasks[name]["test"]}
        assert train and test and not train & test
    assert {r["label"] for r in tasks["slices2d_dataset"]["test"]} == {
        "BraTS2018_Brain", "LUNA2016_Lung", "LiTS2017_Liver", "MSD_Heart"}
    assert not {r["path"] for r in tasks["slices2d_dataset"]["test"]} & pretrain
    assert rq.slices2d_group("slices2d/BraTS2018_Brain/Brats18_TCIA01_101_1_t1ce_frame_011.png") == \
        "BraTS2018_Brain/Brats18_TCIA01_101"
    # BraTS sequences: labels from the name, all-black slices dropped.
    brats = tasks["brats_sequence"]["train"] + tasks["brats_sequence"]["test"]
    assert {r["label"] for r in brats} == {"t1", "t1ce", "t2", "flair"}
    assert len(tasks["brats_sequence"]["dropped_all_black"]) == 10
    assert not any("_frame_000" in r["path"] for r in brats)
    # Volumes: PGBM-001/003 held out of pretraining and are the probe-test; probe-train = FLAIR/T1post of 004/005/009.
    volumes = {r["path"] for r in splits["pretrain_volumes"]}
    assert len(volumes) == 3 + 14
    assert not any("PGBM-001" in p or "PGBM-003" in p for p in volumes)
    assert len(tasks["volume_sequence"]["test"]) == 8 and len(tasks["volume_sequence"]["train"]) == 6
    assert {r["label"] for r in tasks["volume_sequence"]["train"]} == {"FLAIR", "T1post"}
    seg = splits["segmentation"]
    assert all("PGBM-001" in p["image"] for p in seg["train"]) and all("PGBM-003" in p["image"] for p in seg["test"])
    assert len(seg["train"]) == len(seg["test"]) == 4


def test_splits_are_fixed(fake_tree: Path) -> None:
    first, second = rq.build_splits(fake_tree), rq.build_splits(fake_tree)
    assert first["held_out"] == second["held_out"]


def test_check_splits_catches_a_leak(fake_tree: Path) -> None:
    splits = rq.build_splits(fake_tree)
    splits["pretrain_images"].append(splits["tasks"]["brain_tumour_class"]["test"][0])
    with pytest.raises(AssertionError, match="held-out"):
        rq.check_splits(splits)
    splits = rq.build_splits(fake_tree)
    task = splits["tasks"]["cxr_pneumonia"]
    task["train"].append(task["test"][0])
    with pytest.raises(AssertionError, match="both sides"):
        rq.check_splits(splits)


def test_prepare_writes_manifests_without_held_out_items(fake_tree: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    rq.main(["--workdir", str(workdir), "prepare", "--data", str(fake_tree)])
    info = json.loads((workdir / "tasks.json").read_text())
    pretrain = {r["path"] for r in read(info["pretrain"]["images"])} | {r["path"] for r in read(info["pretrain"]["volumes"])}
    assert all(Path(p).is_absolute() and Path(p).exists() for p in pretrain)
    for name, task in info["tasks"].items():
        test = read(task["test"])
        assert test and all(r["label"] for r in test + read(task["train"]))
        assert not {r["path"] for r in test} & pretrain, name
    # The manifests are what the project's readers accept: a `path` column (images) / `path` + modality (volumes).
    from jointssl.data.discovery import discover_images, discover_volumes

    assert len(discover_images([info["pretrain"]["images"]])) == info["pretrain"]["n_images"]
    assert {r.modality for r in discover_volumes([info["pretrain"]["volumes"]])} == {"ct", "mr"}
    assert read(info["tasks"]["cxr_pneumonia"]["test"])[0].keys() == {"path", "label"}
    assert read(info["segmentation"]["train"])[0].keys() == {"image", "label", "modality"}


def test_overrides_scale_every_row_alike(tmp_path: Path) -> None:
    """The same CPU_SCALE for every row; prototype counts per head follow the config's number of heads."""
    for row in ("swav_2d", "deepcluster_2d", "joint_swav", "stage2_mask_swav", "stage2_mask_deepcluster"):
        config = rq.load_yaml(rq.CONFIG_DIR / f"{row}.yaml")
        overrides = rq.row_overrides(config, rq.CPU_SCALE, 1000, 300, 0, tmp_path, tmp_path, "i.csv", None, None)
        for key, value in rq.CPU_SCALE.items():
            if "num_prototypes" not in key:
                assert overrides[key] == value
        heads = len(config["model"]["init_args"].get("num_prototypes", [0]))
        assert overrides["model.init_args.num_prototypes"] == [rq.CPU_SCALE["model.init_args.num_prototypes"]] * heads
        assert overrides["model.init_args.warmup_epochs"] == pytest.approx(0.1 * 1000 / 300, abs=1e-3)
        assert overrides["trainer.max_steps"] == 1000


def test_table_merges_seeds(tmp_path: Path) -> None:
    results = tmp_path / "results"
    for seed, acc in ((0, 0.5), (1, 0.7)):
        report = {"linear_acc": acc, "knn_acc": acc, "auroc_linear": None}
        rq.write_json(results / f"joint_swav_seed{seed}.json", {
            "row": "joint_swav", "seed": seed, "smoke": False,
            "pretrain": {"optimizer_steps": 10, "wall_seconds": 60.0},
            "tasks": {"brain_tumour_class": report}})
    rq.main(["--workdir", str(tmp_path), "table"])
    table = (results / "table.md").read_text()
    assert "| joint_swav | 2 | 10 | 1.0 |" in table
    assert "0.600 ± 0.141 / 0.600 ± 0.141" in table  # linear / kNN, mean ± sd over the 2 seeds


@pytest.mark.slow
@pytest.mark.shared_data
def test_smoke_end_to_end(tmp_path: Path) -> None:
    data = shared_path()
    workdir = tmp_path / "work"
    base = [sys.executable, str(SCRIPT), "--smoke", "--quiet", "--workdir", str(workdir)]
    # random: every code path of the random-init row, on two tasks only (each jointssl call starts in ~10 s).
    for command in (["prepare", "--data", str(data)], ["pretrain", "joint_swav"], ["evaluate", "joint_swav"],
                    ["evaluate", "random", "--tasks", "cxr_pneumonia", "volume_sequence"], ["table"]):
        subprocess.run(base + command, check=True, cwd=REPO_ROOT)
    info = json.loads((workdir / "joint_swav_seed0" / "pretrain_info.json").read_text())
    assert info["status"] == "done" and info["optimizer_steps"] == rq.SMOKE_STEPS
    assert info["compute"]["cpu_count"] and info["wall_seconds"] > 0
    result = json.loads((workdir / "results" / "joint_swav_seed0.json").read_text())
    tasks = json.loads((workdir / "tasks.json").read_text())["tasks"]
    expected = {name if f == t["features"][0] else f"{name}:{f}" for name, t in tasks.items() for f in t["features"]}
    assert set(result["tasks"]) == expected
    for report in result["tasks"].values():
        assert report["split"] == "two_sources" and 0.0 <= report["linear_acc"] <= 1.0
    assert result["tasks"]["cxr_pneumonia"]["auroc_linear"] is not None
    random_result = json.loads((workdir / "results" / "random_seed0.json").read_text())
    assert random_result["random_init"] and all(r["random_init"] for r in random_result["tasks"].values())
    table = (workdir / "results" / "table.md").read_text()
    assert "| joint_swav |" in table and "| random |" in table and "SMOKE" in table
    # Idempotent: a second pretrain call does nothing.
    again = subprocess.run(base + ["pretrain", "joint_swav"], check=True, cwd=REPO_ROOT, capture_output=True, text=True)
    assert "done already" in again.stdout

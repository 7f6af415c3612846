"""Does pretraining give better encoders? Pretrain every row with the project's own configs (scaled down alike to a
2-core CPU), then measure the frozen encoders with the project's own `jointssl embed` + `jointssl evaluate` on
held-out data (linear probe and kNN), and optionally 3D segmentation Dice.

Subcommands (each one resumable and idempotent; everything goes under one work dir, default
runs/representation_quality/, git-ignored):

    prepare  --data DIR              CSV manifests of the pretraining sets (held-out items excluded) and of the
                                     evaluation tasks, and tasks.json with every split rule
    pretrain ROW [--steps S] [--seed N] [--dry-run]
                                     jointssl fit --config configs/pretrain/<row>.yaml + CPU_SCALE overrides,
                                     --ckpt_path last (a killed run resumes); <workdir>/<row>_seed<N>/
                                     (--dry-run: only check the overrides with --print_config)
    evaluate ROW [--seed N] [--with-segmentation]
                                     jointssl embed + jointssl evaluate for every task of tasks.json;
                                     <workdir>/results/<row>_seed<N>.json
    table                            every results JSON as one markdown table: <workdir>/results/table.md

Rows: swav_2d, deepcluster_2d, joint_swav, joint_deepcluster, staged_swav (stage1_2d_swav -> stage2_mask_swav ->
stage3_inter_swav, 50% / 20% / 30% of the same total steps), and random (no pretraining: a finished row's
checkpoint with `--random-init`, i.e. the same architecture with random weights).

`--smoke` (before the subcommand) makes everything tiny (3 steps, 32 px, 20 items per task, a separate work dir
runs/representation_quality_smoke/) so that a test can run the whole chain in a few minutes:

    .venv/bin/python benchmarks/representation_quality.py --smoke prepare
    .venv/bin/python benchmarks/representation_quality.py --smoke pretrain joint_swav
    .venv/bin/python benchmarks/representation_quality.py --smoke evaluate joint_swav
    .venv/bin/python benchmarks/representation_quality.py --smoke table

The data location is an argument (`--data`, default ../shared/data beside the checkout, or $JOINTSSL_SHARED_DATA);
nothing is copied, the manifests point at the files.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from jointssl.checkpointing import write_atomic, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("JOINTSSL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
DEFAULT_WORKDIR = REPO_ROOT / "runs" / "representation_quality"
SMOKE_WORKDIR = REPO_ROOT / "runs" / "representation_quality_smoke"
CONFIG_DIR = REPO_ROOT / "configs" / "pretrain"

# ---------------------------------------------------------------------------------------------------------- splits
SPLIT_SEED = 0  # every seeded split of `prepare` (patients, scans, probe subsets)
CXR_TEST_PATIENT_FRACTION = 0.3  # of the patients of cxr/train, per class folder
BRAIN_MRI_HOLDOUT_FRACTION = 0.2  # of the files of pretrain/brain_mri, by sha256 of the relative path
BRAIN_MRI_PROBE_TRAIN = 2000  # stratified subset of the non-held-out brain_mri files (500 per class)
SLICES2D_TEST_SCAN_FRACTION = 0.3  # of the scans (BraTS: patients) of each slices2d dataset folder
HELD_OUT_VOLUME_PATIENTS = ("PGBM-001", "PGBM-003")  # volumes/mr: brain MR with tumour masks (volumes/labels)
VOLUME_PROBE_TRAIN_PATIENTS = ("PGBM-004", "PGBM-005", "PGBM-009")  # pretrain/volumes/mr
VOLUME_SEQUENCES = ("FLAIR", "T1post")
BRATS_SEQUENCES = ("t1", "t1ce", "t2", "flair")

# Patient id of a Kermany chest X-ray, within its class folder (NORMAL: IM-<n> or NORMAL2-IM-<n>, PNEUMONIA:
# person<n>); the number is the patient within the Kermany *train* split, to which cxr/train and pretrain/cxr both
# belong, so the same key in both folders is the same child.
CXR_PATIENT = {
    "NORMAL": re.compile(r"^(NORMAL2-IM|IM)-(\d+)-"),
    "PNEUMONIA": re.compile(r"^(person)(\d+)_"),
}
SLICE_FILE = re.compile(r"^(?P<scan>.+)_frame_(?P<frame>\d+)\.png$")
BRATS_PATIENT = re.compile(r"^(Brats18_[^_]+_[^_]+)_")
BRATS_SEQUENCE = re.compile(r"_(t1|t1ce|t2|flair)_frame_\d+\.png$")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".npy")
# The same groups as regexes on the absolute path, passed to `jointssl evaluate --group-regex`, which then refuses a
# train/test pair sharing a group: a second, independent check of the splits.
GROUP_REGEX = {
    "cxr_pneumonia": r"/((?:NORMAL|PNEUMONIA)/(?:NORMAL2-IM-|IM-|person)\d+)",
    "slices2d_dataset": r"/(Brats18_[^_/]+_[^_/]+|[^/]+(?=_frame_\d+\.png$))",
    "brats_sequence": r"/(Brats18_[^_/]+_[^_/]+)_",
    "volume_sequence": r"/(PGBM-\d+)_",
}

# ---------------------------------------------------------------------------------------------------- pretraining
PRETRAIN_ROWS = ("swav_2d", "deepcluster_2d", "joint_swav", "joint_deepcluster", "staged_swav")
ROWS = (*PRETRAIN_ROWS, "random")
# The staged recipe: configs and their share of the row's optimizer steps (together = one other row's steps).
STAGES = {"staged_swav": (("stage1_2d_swav", 0.5), ("stage2_mask_swav", 0.2), ("stage3_inter_swav", 0.3))}
# ~ one pass over the 2D pretraining stream (about 290-320 steps of 32 samples per epoch); see benchmarks/README.md
# for the hours this takes per row on 2 CPU cores.
DEFAULT_STEPS = 300

# The ONE set of scale overrides, the same for every row (applied on top of each row's own config). Only sizes,
# counts and devices: nothing about the losses (weights, temperatures, Sinkhorn, learning rates) is touched, so
# the rows differ exactly as their configs do.
CPU_SCALE: dict[str, Any] = {
    "trainer.accelerator": "cpu",
    "trainer.devices": 1,
    "trainer.precision": "32-true",
    "trainer.log_every_n_steps": 10,
    "trainer.enable_progress_bar": False,
    "model.init_args.backbone": "resnet18",
    "model.init_args.d_model": 256,
    "model.init_args.projection_hidden_dim": 512,
    "model.init_args.projection_dim": 128,
    # Prototypes PER HEAD; the number of heads stays the config's (SwAV 1, DeepCluster-v2 3). About 10k 2D
    # pretraining samples -> 300 2D prototypes (~30 samples each).
    "model.init_args.num_prototypes": 300,
    # 27 pretraining volumes: the 3D prototypes must be well below that (DeepCluster-v2's k-means needs at least
    # as many volumes as clusters, and SwAV's equipartition over a 4-volume batch + queue needs few clusters).
    "model.init_args.num_prototypes_3d": 8,
    # SwAV queues (total rows): 32 batches of 32 2D samples (~3.5 rows per prototype with the batch), and 4
    # volume batches of 4 (16 < 27: a volume is not in the queue twice within an epoch). DeepCluster ignores them.
    "model.init_args.queue_length": 1024,
    "model.init_args.queue_length_3d": 16,
    # 16 slices x 64 px fit in memory without recomputing activations.
    "model.init_args.checkpoint_slices": False,
    "data.init_args.batch_size": 32,
    "data.init_args.volume_batch_size": 4,
    "data.init_args.num_workers": 2,
    "data.init_args.validation_threads": 2,
    "data.init_args.global_crop_size": 64,
    "data.init_args.local_crop_size": 32,
    "data.init_args.num_slices": 16,
    "data.init_args.volume_size": 64,
    "data.init_args.volume_in_plane_size": 96,
}
# Schedules that the configs give in epochs (or in steps of a 100-epoch run), as fractions of the row's own
# optimizer steps S; converted with the row's epoch length (estimated from the manifests: an epoch is one pass
# over the longer stream, 2D samples / batch or volumes / volume batch, whichever is more).
WARMUP_FRACTION = 0.10  # configs: warmup_epochs 10 of max_epochs 100
QUEUE_START_FRACTION = 0.15  # configs: queue_start_epoch 15 of 100 (rounded down to an epoch start)
FREEZE_PROTOTYPES_FRACTION = 0.05  # SwAV freezes the prototypes for about its first epoch; 5% of S here
# Applied on top of CPU_SCALE by --smoke only (a test of the plumbing, not a measurement).
SMOKE_SCALE: dict[str, Any] = {
    "model.init_args.d_model": 64,
    "model.init_args.projection_hidden_dim": 64,
    "model.init_args.projection_dim": 32,
    "model.init_args.num_prototypes": 8,
    "model.init_args.num_prototypes_3d": 2,
    "model.init_args.queue_length": 32,
    "model.init_args.queue_length_3d": 4,
    "data.init_args.batch_size": 8,
    "data.init_args.volume_batch_size": 2,
    "data.init_args.num_workers": 0,
    "data.init_args.global_crop_size": 32,
    "data.init_args.local_crop_size": 16,
    "data.init_args.num_slices": 8,
    "data.init_args.volume_size": 32,
    "data.init_args.volume_in_plane_size": 48,
}
SMOKE_STEPS = 3
SMOKE_ITEMS = 20  # per task: half probe-train, half probe-test
SMOKE_PRETRAIN_IMAGES = 48
SMOKE_PRETRAIN_VOLUMES = 4  # the smallest ones

# ----------------------------------------------------------------------------------------------------- evaluation
EMBED_IMAGE_SIZE = 64  # = the global crop size of CPU_SCALE
EMBED_VOLUME_SIZE = 64  # = the volume view size of CPU_SCALE
SMOKE_EMBED_SIZE = 32
# Segmentation (--with-segmentation): configs/downstream/seg_brain_tumor.yaml with these overrides for both inits.
SEGMENTATION_STEPS = 150
SEGMENTATION_SCALE: dict[str, Any] = {
    "trainer.accelerator": "cpu",
    "trainer.devices": 1,
    "trainer.max_epochs": 1,  # one epoch of SEGMENTATION_STEPS batches, validated once at its end
    "trainer.enable_progress_bar": False,
    "trainer.num_sanity_val_steps": 0,
    "data.init_args.in_plane_size": 96,
    "data.init_args.batch_size": 16,
    "data.init_args.num_workers": 2,
    "model.init_args.backbone": CPU_SCALE["model.init_args.backbone"],  # random init: the pretrained architecture
    "model.init_args.d_model": CPU_SCALE["model.init_args.d_model"],
}
SMOKE_SEGMENTATION_STEPS = 2


# ================================================================================================== small helpers
def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def files_under(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.name.lower().endswith(tuple(suffixes))
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unit_hash(text: str) -> float:
    """A fixed pseudo-random number in [0, 1) from a string (the first 64 bits of its sha256)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64


def choose_groups(groups: Iterable[str], fraction: float, seed: int) -> set[str]:
    """A fixed random `fraction` of the distinct groups (rounded, at least 1 when there are 2 or more)."""
    unique = sorted(set(groups))
    k = round(fraction * len(unique))
    if len(unique) >= 2:
        k = min(max(k, 1), len(unique) - 1)
    return set(random.Random(seed).sample(unique, k))


def stratified_take(rows: Sequence[dict[str, Any]], n: int, seed: int, key: str = "label") -> list[dict[str, Any]]:
    """`n` rows drawn at random, as evenly over the values of `key` as the classes allow; input order kept."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_class[str(row.get(key, ""))].append(i)
    rng = random.Random(seed)
    for indices in by_class.values():
        rng.shuffle(indices)
    chosen: list[int] = []
    pools = [by_class[c] for c in sorted(by_class)]
    while len(chosen) < min(n, len(rows)):
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return [rows[i] for i in sorted(chosen)]


def all_black(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("L").getextrema() == (0, 0)


# ================================================================================================ split rules
def cxr_patient(relpath: str) -> str:
    """Group key of a chest X-ray: '<class folder>/<prefix>-<patient number>' (e.g. 'NORMAL/NORMAL2-IM-1234',
    'PNEUMONIA/person17'). The README: the part before the image counter identifies the patient within a split."""
    parts = relpath.split("/")
    label, name = parts[-2], parts[-1]
    match = CXR_PATIENT[label].match(name) if label in CXR_PATIENT else None
    if match is None:
        raise ValueError(f"{relpath}: no Kermany patient id in the file name")
    return f"{label}/{match.group(1)}-{int(match.group(2))}"


def slices2d_group(relpath: str) -> str:
    """'<dataset folder>/<scan id>' of a slices2d PNG; for BraTS the patient (Brats18_<site>_<id>), so that a
    patient's sequences stay together."""
    dataset, name = relpath.split("/")[-2:]
    match = SLICE_FILE.match(name)
    if match is None:
        raise ValueError(f"{relpath}: not named <scan id>_frame_<NNN>.png")
    scan = match.group("scan")
    patient = BRATS_PATIENT.match(scan + "_")
    if dataset.startswith("BraTS") and patient:
        scan = patient.group(1)
    return f"{dataset}/{scan}"


def brats_sequence(relpath: str) -> str | None:
    match = BRATS_SEQUENCE.search(relpath)
    return match.group(1) if match else None


def volume_patient(name: str) -> str | None:
    match = re.match(r"^(PGBM-\d+)_", name)
    return match.group(1) if match else None


def volume_sequence(name: str) -> str | None:
    match = re.match(r"^PGBM-\d+_[\d-]+_([A-Za-z0-9]+)\.nii(\.gz)?$", name)
    return match.group(1) if match else None


def build_splits(data: Path, seed: int = SPLIT_SEED, check_black: bool = True) -> dict[str, Any]:
    """Every split of the benchmark from the file tree under `data` (only names are read, plus the brain_mri bytes
    for duplicate detection and the BraTS PNGs for all-black detection). Returns the pretraining sets, the task sets
    and the rules; rows hold paths relative to `data`."""
    data = Path(data)
    image_suffixes = (".png", ".jpg", ".jpeg")

    # --- chest X-rays: test patients from cxr/train, excluded from pretraining in both folders
    cxr_train = [rel(p, data) for p in files_under(data / "cxr" / "train", image_suffixes)]
    cxr_extra = [rel(p, data) for p in files_under(data / "pretrain" / "cxr", image_suffixes)]
    test_patients: set[str] = set()
    for label in sorted({p.split("/")[-2] for p in cxr_train}):
        groups = [cxr_patient(p) for p in cxr_train if p.split("/")[-2] == label]
        test_patients |= choose_groups(groups, CXR_TEST_PATIENT_FRACTION, seed)
    cxr_rows = [
        {"path": p, "label": p.split("/")[-2], "group": cxr_patient(p), "source": "cxr"} for p in cxr_train + cxr_extra
    ]
    cxr_probe_train = [r for r in cxr_rows if r["path"] in set(cxr_train) and r["group"] not in test_patients]
    cxr_probe_test = [r for r in cxr_rows if r["path"] in set(cxr_train) and r["group"] in test_patients]
    cxr_pretrain = [r for r in cxr_rows if r["group"] not in test_patients]

    # --- brain MRI: a fixed hash-based 20% held out; byte-identical copies follow the first copy's decision
    brain_files = files_under(data / "pretrain" / "brain_mri", image_suffixes)
    copies: dict[str, list[str]] = defaultdict(list)
    for path in brain_files:
        copies[sha256_file(path)].append(rel(path, data))
    brain_rows = []
    for members in copies.values():
        representative = min(members)
        held_out = unit_hash(representative) < BRAIN_MRI_HOLDOUT_FRACTION
        for p in members:
            brain_rows.append({"path": p, "label": p.split("/")[-2], "group": representative, "held_out": held_out,
                               "source": "brain_mri"})
    brain_rows.sort(key=lambda r: r["path"])
    brain_pretrain = [r for r in brain_rows if not r["held_out"]]
    brain_probe_test = [r for r in brain_rows if r["held_out"]]
    brain_probe_train = stratified_take(brain_pretrain, BRAIN_MRI_PROBE_TRAIN, seed)

    # --- slices2d: ~30% of the scans (BraTS: patients) of every dataset folder held out
    slice_rows = [
        {"path": rel(p, data), "label": p.parent.name, "group": slices2d_group(rel(p, data)), "source": "slices2d"}
        for p in files_under(data / "slices2d", (".png",))
    ]
    test_scans: set[str] = set()
    for dataset in sorted({r["label"] for r in slice_rows}):
        groups = [r["group"] for r in slice_rows if r["label"] == dataset]
        test_scans |= choose_groups(groups, SLICES2D_TEST_SCAN_FRACTION, seed)
    slices_pretrain = [r for r in slice_rows if r["group"] not in test_scans]
    slices_probe_train = slices_pretrain
    slices_probe_test = [r for r in slice_rows if r["group"] in test_scans]
    black: list[str] = []
    brats_train, brats_test = [], []
    for source, target in ((slices_probe_train, brats_train), (slices_probe_test, brats_test)):
        for r in source:
            sequence = brats_sequence(r["path"]) if r["label"].startswith("BraTS") else None
            if sequence is None:
                continue
            if check_black and all_black(data / r["path"]):
                black.append(r["path"])
                continue
            target.append({**r, "label": sequence})

    # --- volumes
    def volume_row(path: Path) -> dict[str, Any]:
        modality = {"ct": "CT", "mr": "MR"}.get(path.parent.name.lower(), "")
        name = path.name
        return {"path": rel(path, data), "modality": modality, "group": volume_patient(name) or name,
                "label": volume_sequence(name) or "", "source": "volumes", "size": path.stat().st_size}

    reference_volumes = [volume_row(p) for p in files_under(data / "volumes" / "ct", VOLUME_SUFFIXES)]
    reference_volumes += [volume_row(p) for p in files_under(data / "volumes" / "mr", VOLUME_SUFFIXES)]
    extra_volumes = [volume_row(p) for p in files_under(data / "pretrain" / "volumes", VOLUME_SUFFIXES)]
    held_out_volumes = [r for r in reference_volumes if r["group"] in HELD_OUT_VOLUME_PATIENTS]
    volumes_pretrain = [r for r in reference_volumes + extra_volumes if r["group"] not in HELD_OUT_VOLUME_PATIENTS]
    volume_probe_train = [
        r for r in extra_volumes if r["group"] in VOLUME_PROBE_TRAIN_PATIENTS and r["label"] in VOLUME_SEQUENCES
    ]
    volume_probe_test = [r for r in held_out_volumes if r["label"] in VOLUME_SEQUENCES]

    # --- segmentation pairs (volumes/pairs.csv): train on PGBM-001, test on PGBM-003
    seg_train, seg_test = [], []
    pairs_csv = data / "volumes" / "pairs.csv"
    if pairs_csv.is_file():
        for row in read_csv(pairs_csv):
            if not row.get("label"):
                continue
            pair = {"image": f"volumes/{row['image']}", "label": f"volumes/{row['label']}",
                    "modality": row.get("modality", "")}
            patient = volume_patient(Path(row["image"]).name)
            if patient == HELD_OUT_VOLUME_PATIENTS[0]:
                seg_train.append(pair)
            elif patient == HELD_OUT_VOLUME_PATIENTS[1]:
                seg_test.append(pair)

    tasks = {
        "cxr_pneumonia": {
            "kind": "images", "train": cxr_probe_train, "test": cxr_probe_test, "features": ["features"],
            "metric": "auroc",
            "split": (f"cxr/train only. Patients (class folder + Kermany id: NORMAL IM-<n> / NORMAL2-IM-<n>, "
                      f"PNEUMONIA person<n>) drawn per class, {CXR_TEST_PATIENT_FRACTION:.0%} with "
                      f"random.Random({seed}); probe-test = every cxr/train image of those patients, probe-train = "
                      f"the rest. Every image of a test patient (cxr/train AND pretrain/cxr) is excluded from "
                      f"pretraining."),
        },
        "brain_tumour_class": {
            "kind": "images", "train": brain_probe_train, "test": brain_probe_test, "features": ["features"],
            "metric": "accuracy",
            "split": (f"pretrain/brain_mri, 4 classes. Held out: sha256(relative path) < {BRAIN_MRI_HOLDOUT_FRACTION} "
                      f"of 2^256 (byte-identical copies follow the decision of their first path, so no exact copy "
                      f"is on both sides); probe-test = the held-out files (excluded from pretraining), probe-train "
                      f"= a class-stratified {BRAIN_MRI_PROBE_TRAIN} of the others (random.Random({seed})). NOT "
                      f"patient-disjoint: the source has no patient ids, neighbouring slices of one patient and "
                      f"near-copies (re-encoded JPEGs) can be on both sides."),
        },
        "slices2d_dataset": {
            "kind": "images", "train": slices_probe_train, "test": slices_probe_test, "features": ["features"],
            "metric": "accuracy",
            "split": (f"slices2d, label = dataset folder (4 classes). Grouped by scan id (<scan id>_frame_<NNN>.png; "
                      f"BraTS by patient Brats18_<site>_<id>); {SLICES2D_TEST_SCAN_FRACTION:.0%} of the groups of "
                      f"each folder held out with random.Random({seed}): probe-test (excluded from pretraining); "
                      f"probe-train = the other scans' slices. All-black BraTS slices are kept here."),
        },
        "brats_sequence": {
            "kind": "images", "train": brats_train, "test": brats_test, "features": ["features"],
            "metric": "accuracy",
            "split": (f"slices2d/BraTS2018_Brain, label = MR sequence from the file name (t1, t1ce, t2, flair); the "
                      f"patient split of slices2d_dataset. All-black slices (every pixel 0) dropped from both sides: "
                      f"{len(black)} of them."),
            "dropped_all_black": black,
        },
        "volume_sequence": {
            "kind": "volumes", "train": volume_probe_train, "test": volume_probe_test,
            "features": ["volume", "slice_mean"], "metric": "accuracy",
            "split": (f"FLAIR vs T1post brain MR volumes. probe-train = {', '.join(VOLUME_PROBE_TRAIN_PATIENTS)} "
                      f"(pretrain/volumes/mr; these are pretraining volumes), probe-test = "
                      f"{', '.join(HELD_OUT_VOLUME_PATIENTS)} (volumes/mr, held out from pretraining). Features: "
                      f"f_inter's volume embedding (`volume`) and the mean of f_intra's slice embeddings "
                      f"(`slice_mean`)."),
        },
    }
    return {
        "pretrain_images": cxr_pretrain + brain_pretrain + slices_pretrain,
        "pretrain_volumes": volumes_pretrain,
        "held_out": {
            "cxr_test_patients": sorted(test_patients),
            "slices2d_test_groups": sorted(test_scans),
            "brain_mri_held_out": [r["path"] for r in brain_probe_test],
            "volumes": [r["path"] for r in held_out_volumes],
        },
        "tasks": tasks,
        "segmentation": {
            "train": seg_train, "test": seg_test,
            "split": (f"configs/downstream/seg_brain_tumor.yaml (include *FLAIR*): train on the "
                      f"{HELD_OUT_VOLUME_PATIENTS[0]} pairs of volumes/pairs.csv, validate (3D Dice, whole volumes) on "
                      f"{HELD_OUT_VOLUME_PATIENTS[1]}; both patients are held out from pretraining."),
        },
    }


def check_splits(splits: dict[str, Any]) -> None:
    """No held-out item in the pretraining sets; no group on both sides of any task split."""
    pretrain = {r["path"] for r in splits["pretrain_images"]} | {r["path"] for r in splits["pretrain_volumes"]}
    pretrain_groups = {r["group"] for r in splits["pretrain_images"]}
    for name, task in splits["tasks"].items():
        train_groups = {r["group"] for r in task["train"]}
        test_groups = {r["group"] for r in task["test"]}
        shared = train_groups & test_groups
        if shared:
            raise AssertionError(f"{name}: groups on both sides of the split: {sorted(shared)[:5]}")
        leaked = {r["path"] for r in task["test"]} & pretrain
        if leaked:
            raise AssertionError(f"{name}: held-out items in the pretraining sets: {sorted(leaked)[:5]}")
        if name != "volume_sequence":
            leaked_groups = test_groups & pretrain_groups
            if leaked_groups:
                raise AssertionError(f"{name}: held-out groups in the pretraining sets: {sorted(leaked_groups)[:5]}")
    held_volumes = set(splits["held_out"]["volumes"])
    if held_volumes & pretrain:
        raise AssertionError(f"held-out volumes in the pretraining set: {sorted(held_volumes & pretrain)}")
    seg = splits["segmentation"]
    if {p["image"] for p in seg["train"] + seg["test"]} & pretrain:
        raise AssertionError("segmentation volumes in the pretraining set")


# ================================================================================================ prepare
def cmd_prepare(args: argparse.Namespace) -> None:
    data = Path(args.data).resolve()
    if not (data / "cxr" / "train").is_dir():
        raise SystemExit(f"not the reference data folder (no cxr/train): {data}")
    workdir = args.workdir
    started = time.time()
    splits = build_splits(data)
    check_splits(splits)
    if args.smoke:
        splits = smoke_subset(splits)
        check_splits(splits)
    manifests = workdir / "manifests"

    def absolute(rows: Sequence[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
        return [{**r, **{k: str(data / r[k]) for k in keys}} for r in rows]

    images_csv = write_csv(manifests / "pretrain_images.csv", absolute(splits["pretrain_images"], "path"),
                           ["path", "label", "source"])
    volumes_csv = write_csv(manifests / "pretrain_volumes.csv", absolute(splits["pretrain_volumes"], "path"),
                            ["path", "modality", "source"])
    tasks_out: dict[str, Any] = {}
    for name, task in splits["tasks"].items():
        columns = ["path", "label"] + (["modality"] if task["kind"] == "volumes" else [])
        entry = {k: v for k, v in task.items() if k not in ("train", "test")}
        for side in ("train", "test"):
            path = write_csv(manifests / f"{name}_{side}.csv", absolute(task[side], "path"), columns)
            entry[side] = str(path)
            entry[f"n_{side}"] = len(task[side])
            entry[f"classes_{side}"] = dict(sorted(_count(task[side], "label").items()))
        entry["group_regex"] = GROUP_REGEX.get(name)
        tasks_out[name] = entry
    seg = splits["segmentation"]
    seg_out = {"split": seg["split"], "config": "configs/downstream/seg_brain_tumor.yaml"}
    for side in ("train", "test"):
        path = write_csv(manifests / f"segmentation_{side}_pairs.csv", absolute(seg[side], "image", "label"),
                         ["image", "label", "modality"])
        seg_out[side] = str(path)
        seg_out[f"n_{side}_pairs"] = len(seg[side])
    info = {
        "data": str(data),
        "smoke": bool(args.smoke),
        "split_seed": SPLIT_SEED,
        "pretrain": {
            "images": str(images_csv), "volumes": str(volumes_csv),
            "n_images": len(splits["pretrain_images"]), "n_volumes": len(splits["pretrain_volumes"]),
            "images_by_source": dict(sorted(_count(splits["pretrain_images"], "source").items())),
            "excluded": {
                "cxr_test_patients": len(splits["held_out"]["cxr_test_patients"]),
                "cxr_images_of_test_patients": sum(
                    1 for r in _cxr_all(data) if cxr_patient(r) in set(splits["held_out"]["cxr_test_patients"])
                ),
                "brain_mri_held_out": len(splits["held_out"]["brain_mri_held_out"]),
                "slices2d_test_groups": len(splits["held_out"]["slices2d_test_groups"]),
                "volumes": splits["held_out"]["volumes"],
            },
            "rules": [
                "chest X-rays: cxr/train + pretrain/cxr minus every image of the cxr_pneumonia test patients",
                "brain MRI: pretrain/brain_mri minus the brain_tumour_class held-out files (not patient-disjoint)",
                "slices2d: minus the held-out scans of slices2d_dataset / brats_sequence",
                "volumes: volumes/ct/*, volumes/mr/example_mr_sm.nii.gz and pretrain/volumes/**; "
                f"volumes/mr/{{{','.join(HELD_OUT_VOLUME_PATIENTS)}}}* held out",
            ],
        },
        "tasks": tasks_out,
        "segmentation": seg_out,
        "seconds": round(time.time() - started, 1),
    }
    write_json(workdir / "tasks.json", info)
    print(f"prepared {workdir}: {info['pretrain']['n_images']} pretraining images "
          f"{info['pretrain']['images_by_source']}, {info['pretrain']['n_volumes']} volumes")
    for name, task in tasks_out.items():
        print(f"  {name}: train {task['n_train']} {task['classes_train']}, test {task['n_test']} {task['classes_test']}")
    print(f"  segmentation: {seg_out['n_train_pairs']} train pairs, {seg_out['n_test_pairs']} test pairs")


def _count(rows: Iterable[dict[str, Any]], key: str) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[str(r.get(key, ""))] += 1
    return counts


def _cxr_all(data: Path) -> list[str]:
    suffixes = (".png", ".jpg", ".jpeg")
    return [rel(p, data) for folder in (data / "cxr" / "train", data / "pretrain" / "cxr")
            for p in files_under(folder, suffixes)]


def smoke_subset(splits: dict[str, Any]) -> dict[str, Any]:
    """A tiny version of every set (same split decisions, fewer items)."""
    out = dict(splits)
    out["pretrain_images"] = stratified_take(splits["pretrain_images"], SMOKE_PRETRAIN_IMAGES, SPLIT_SEED, "source")
    # The smallest pretraining volumes (by file size): quick to decode.
    volumes = sorted(splits["pretrain_volumes"], key=lambda r: (r.get("size", 0), r["path"]))
    out["pretrain_volumes"] = volumes[:SMOKE_PRETRAIN_VOLUMES]
    out["tasks"] = {}
    for name, task in splits["tasks"].items():
        half = SMOKE_ITEMS // 2 if task["kind"] == "images" else 2
        out["tasks"][name] = {**task, "train": stratified_take(task["train"], half, SPLIT_SEED),
                              "test": stratified_take(task["test"], half, SPLIT_SEED)}
    seg = splits["segmentation"]
    flair = {side: [p for p in seg[side] if "FLAIR" in Path(p["image"]).name][:1] for side in ("train", "test")}
    out["segmentation"] = {**seg, **flair}
    return out


# ================================================================================================ pretrain
def jointssl_exe() -> str:
    for candidate in (Path(sys.executable).parent / "jointssl", REPO_ROOT / ".venv" / "bin" / "jointssl"):
        if candidate.exists():
            return str(candidate)
    raise SystemExit("jointssl executable not found (make install)")


def load_tasks(workdir: Path, smoke: bool) -> dict[str, Any]:
    path = workdir / "tasks.json"
    if not path.is_file():
        raise SystemExit(f"{path} missing: run `prepare` first")
    info = read_json(path)
    if bool(info.get("smoke")) != bool(smoke):
        raise SystemExit(f"{path} was prepared with smoke={info.get('smoke')}; this call has smoke={smoke}")
    return info


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def axial_slices(path: str) -> int:
    """Number of axial slices of a NIfTI volume from its header (the slice stream's samples per volume)."""
    try:
        import nibabel as nib

        image = nib.load(path)
        codes = nib.aff2axcodes(image.affine)
        axis = next(i for i, c in enumerate(codes) if c in ("S", "I"))
        return int(image.shape[axis])
    except Exception:  # noqa: BLE001 - only an estimate of the epoch length
        return 0


def steps_per_epoch(config: dict[str, Any], scale: dict[str, Any], images_csv: str | None,
                    volumes_csv: str | None) -> int:
    """Optimizer steps per epoch of a row (one pass over the longer stream; both loaders drop the last batch)."""
    data = config.get("data", {}).get("init_args", {})
    n_images = len(read_csv(Path(images_csv))) if images_csv else 0
    volumes = [r["path"] for r in read_csv(Path(volumes_csv))] if volumes_csv else []
    n_2d = n_images
    if volumes and data.get("slice_stream", True):
        stride = max(1, int(data.get("slice_stride", 1)))
        n_2d += sum(math.ceil(axial_slices(p) / stride) for p in volumes)
    batch = int(scale["data.init_args.batch_size"])
    volume_batch = int(scale["data.init_args.volume_batch_size"])
    return max(1, n_2d // batch, len(volumes) // volume_batch if volumes else 0)


def row_overrides(config: dict[str, Any], scale: dict[str, Any], steps: int, spe: int, seed: int, root: Path,
                  workdir: Path, images_csv: str | None, volumes_csv: str | None,
                  init_from: str | None) -> dict[str, Any]:
    """CPU_SCALE (per-head prototype counts expanded to the config's heads), the schedules derived from the row's
    steps, and the run's own settings."""
    model = config.get("model", {}).get("init_args", {})
    overrides = dict(scale)
    for key, config_key in (("model.init_args.num_prototypes", "num_prototypes"),
                            ("model.init_args.num_prototypes_3d", "num_prototypes_3d")):
        heads = len(model.get(config_key) or [0])
        overrides[key] = [int(scale[key])] * heads
    overrides.update({
        "trainer.max_steps": steps,
        "trainer.max_epochs": 1_000_000,  # max_steps ends the run
        "trainer.default_root_dir": str(root),
        "seed_everything": seed,
        "data.init_args.seed": seed,
        "data.init_args.cache_dir": str(workdir / "cache"),
        "model.init_args.warmup_epochs": round(WARMUP_FRACTION * steps / spe, 4),
        "model.init_args.queue_start_epoch": int(QUEUE_START_FRACTION * steps // spe),
        "model.init_args.freeze_prototypes_steps": int(round(FREEZE_PROTOTYPES_FRACTION * steps)),
    })
    if images_csv:
        overrides["data.init_args.images"] = [images_csv]
    if volumes_csv:
        overrides["data.init_args.volumes"] = [volumes_csv]
    if init_from:
        overrides["model.init_args.init_from"] = init_from
    return overrides


# Lightning's Timer callback, appended to each config's callbacks: its training time (saved in the checkpoint, so
# it adds up over resumed attempts) is the pretraining compute reported, without the data checks of `setup`.
TIMER = "lightning.pytorch.callbacks.Timer"


def cli_args(overrides: dict[str, Any]) -> list[str]:
    return [f"--{key}={json.dumps(value) if isinstance(value, (list, bool)) else value}"
            for key, value in overrides.items()]


def pretrain_args(overrides: dict[str, Any]) -> list[str]:
    # interval given as a string: the default (an enum) cannot be written into the run's config.yaml.
    return [*cli_args(overrides), f"--trainer.callbacks+={TIMER}", "--trainer.callbacks.interval=step",
            "--trainer.callbacks.verbose=false"]


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def verify_overrides(config_path: Path, overrides: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """`jointssl fit --print_config` with the overrides: every key must exist and hold the value given."""
    command = [jointssl_exe(), "fit", "--config", str(config_path), *pretrain_args(overrides), "--print_config"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"jointssl fit --print_config rejected the overrides:\n{result.stderr[-4000:]}")
    import yaml

    printed = yaml.safe_load(result.stdout)
    wrong = []
    for key, value in overrides.items():
        try:
            got = _lookup(printed, key)
        except KeyError:
            wrong.append(f"{key}: not in the printed config")
            continue
        if not _same(got, value):
            wrong.append(f"{key}: printed {got!r}, given {value!r}")
    callbacks = [c.get("class_path") for c in (printed.get("trainer", {}).get("callbacks") or [])]
    if TIMER not in callbacks:
        wrong.append(f"trainer.callbacks: no {TIMER} in {callbacks}")
    if wrong:
        raise SystemExit("overrides not applied as given:\n  " + "\n  ".join(wrong))
    return printed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def compute_info(threads: int) -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "load_average_at_start": load, "host": platform.node(), "python": platform.python_version()}


def checkpoint_global_step(path: Path) -> int | None:
    return checkpoint_progress(path)[0]


def checkpoint_progress(path: Path) -> tuple[int | None, float | None]:
    """(global step, seconds of training by the Timer callback) of a checkpoint; None when absent."""
    if not path.is_file():
        return None, None
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    train_seconds = None
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("Timer") and isinstance(state, dict):
            train_seconds = float(state.get("time_elapsed", {}).get("train", 0.0))
    return int(checkpoint.get("global_step", -1)), train_seconds


def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"  # the log's timestamps are the output's
    return env


def run_logged(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run a command, teeing its output into log_path (appended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert process.stdout is not None
        started = time.time()
        for line in process.stdout:
            log.write(f"[{time.time() - started:8.1f}s] {line}")
            log.flush()
            if not QUIET:
                sys.stdout.write(line)
        return process.wait()


QUIET = False


def pretrain_stage(config_name: str, root: Path, steps: int, seed: int, args: argparse.Namespace,
                   tasks: dict[str, Any], init_from: str | None) -> dict[str, Any]:
    """One `jointssl fit` run (resumed when interrupted); returns its pretrain_info.json content."""
    info_path = root / "pretrain_info.json"
    config_path = CONFIG_DIR / f"{config_name}.yaml"
    config = load_yaml(config_path)
    data = config.get("data", {}).get("init_args", {})
    images_csv = tasks["pretrain"]["images"] if data.get("images") else None
    volumes_csv = tasks["pretrain"]["volumes"] if data.get("volumes") else None
    scale = {**CPU_SCALE, **(SMOKE_SCALE if args.smoke else {})}
    spe = steps_per_epoch(config, scale, images_csv, volumes_csv)
    overrides = row_overrides(config, scale, steps, spe, seed, root, args.workdir, images_csv, volumes_csv, init_from)
    last = root / "checkpoints" / "last.ckpt"
    previous = read_json(info_path) if info_path.is_file() else None
    if previous and previous.get("overrides") != overrides:
        raise SystemExit(f"{root} holds a run with other settings (see {info_path}); choose another --seed or "
                         f"--workdir, or delete it")
    if previous and previous.get("status") == "done" and checkpoint_global_step(last) == steps:
        print(f"{config_name}: done already ({steps} steps, {previous['wall_seconds']:.0f} s): {last}")
        return previous
    env = subprocess_env(args.threads)
    print(f"{config_name}: {steps} steps, ~{spe} steps per epoch; checking the overrides (--print_config)")
    verify_overrides(config_path, overrides, env)
    command = [jointssl_exe(), "fit", "--config", str(config_path), *pretrain_args(overrides), "--ckpt_path", "last"]
    if args.dry_run:
        print(f"{config_name}: every override applied as given; the command:\n  " + " ".join(command))
        return {"optimizer_steps": steps, "wall_seconds": 0.0, "checkpoint": str(last)}
    info = previous or {
        "config": str(config_path.relative_to(REPO_ROOT)), "steps_requested": steps, "seed": seed,
        "steps_per_epoch_estimate": spe, "overrides": overrides, "attempts": [],
    }
    info["status"] = "running"
    info["compute"] = compute_info(args.threads)
    write_json(info_path, info)
    start_step = checkpoint_global_step(last) or 0
    started = time.time()
    rc = run_logged(command, root / "pretrain.log", env)
    seconds = time.time() - started
    end_step, train_seconds = checkpoint_progress(last)
    info["attempts"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                             "seconds": round(seconds, 1), "from_step": start_step, "to_step": end_step, "rc": rc})
    info["wall_seconds"] = round(sum(a["seconds"] for a in info["attempts"]), 1)
    info["train_seconds"] = None if train_seconds is None else round(train_seconds, 1)
    info["optimizer_steps"] = end_step
    info["checkpoint"] = str(last)
    if rc != 0 or end_step != steps:
        info["status"] = "failed"
        write_json(info_path, info)
        raise SystemExit(f"{config_name}: jointssl fit exited {rc} at step {end_step} of {steps}; log: "
                         f"{root / 'pretrain.log'} (run the same command again to resume)")
    info["status"] = "done"
    if train_seconds is not None:
        info["seconds_per_step"] = round(train_seconds / max(1, end_step), 3)
    write_json(info_path, info)
    print(f"{config_name}: {end_step} steps in {seconds:.0f} s wall, {info['train_seconds']} s training "
          f"({info.get('seconds_per_step')} s/step)")
    return info


def cmd_pretrain(args: argparse.Namespace) -> None:
    tasks = load_tasks(args.workdir, args.smoke)
    steps = args.steps or (SMOKE_STEPS if args.smoke else DEFAULT_STEPS)
    run_dir = args.workdir / f"{args.row}_seed{args.seed}"
    if args.row not in STAGES:
        pretrain_stage(args.row, run_dir, steps, args.seed, args, tasks, None)
        return
    stages = STAGES[args.row]
    if steps < len(stages):
        raise SystemExit(f"{args.row} needs at least {len(stages)} steps (one per stage)")
    counts = [max(1, int(share * steps)) for _, share in stages[:-1]]
    counts.append(steps - sum(counts))
    init_from: str | None = None
    infos = []
    for (config_name, _), count in zip(stages, counts):
        info = pretrain_stage(config_name, run_dir / config_name, count, args.seed, args, tasks, init_from)
        infos.append({"config": config_name, "steps": info["optimizer_steps"], "wall_seconds": info["wall_seconds"],
                      "train_seconds": info.get("train_seconds"), "seconds_per_step": info.get("seconds_per_step"),
                      "checkpoint": info["checkpoint"]})
        init_from = info["checkpoint"]
    if args.dry_run:
        return
    info = {
        "row": args.row, "status": "done", "seed": args.seed, "steps_requested": steps,
        "optimizer_steps": sum(s["steps"] for s in infos),
        "wall_seconds": round(sum(s["wall_seconds"] for s in infos), 1),
        "train_seconds": round(sum(s["train_seconds"] or 0.0 for s in infos), 1),
        "stages": infos, "checkpoint": infos[-1]["checkpoint"], "compute": compute_info(args.threads),
    }
    write_json(run_dir / "pretrain_info.json", info)
    print(f"{args.row}: {info['optimizer_steps']} steps in {info['wall_seconds']:.0f} s -> {info['checkpoint']}")


def row_checkpoint(workdir: Path, row: str, seed: int) -> tuple[Path, bool, str]:
    """(checkpoint, random_init, the row it comes from) for evaluating `row`."""
    if row == "random":
        for source in ("joint_swav", *PRETRAIN_ROWS):
            for info_path in sorted(workdir.glob(f"{source}_seed*/pretrain_info.json")):
                info = read_json(info_path)
                if info.get("status") == "done" and Path(info["checkpoint"]).is_file():
                    return Path(info["checkpoint"]), True, info_path.parent.name
        raise SystemExit("the random row needs a finished row's checkpoint (for its architecture): pretrain one first")
    info_path = workdir / f"{row}_seed{seed}" / "pretrain_info.json"
    if not info_path.is_file() or read_json(info_path).get("status") != "done":
        raise SystemExit(f"{row} seed {seed} is not pretrained yet ({info_path})")
    return Path(read_json(info_path)["checkpoint"]), False, f"{row}_seed{seed}"


# ================================================================================================ evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    tasks = load_tasks(args.workdir, args.smoke)
    checkpoint, random_init, source = row_checkpoint(args.workdir, args.row, args.seed)
    name = f"{args.row}_seed{args.seed}"
    embed_root = args.workdir / "embeddings" / name
    report_root = args.workdir / "reports" / name
    env = subprocess_env(args.threads)
    checkpoint_sha = sha256_file(checkpoint)
    size = SMOKE_EMBED_SIZE if args.smoke else EMBED_IMAGE_SIZE
    volume_size = SMOKE_EMBED_SIZE if args.smoke else EMBED_VOLUME_SIZE
    results: dict[str, Any] = {}
    for task_name, task in tasks["tasks"].items():
        if args.tasks and task_name not in args.tasks:
            continue
        dirs = {}
        for side in ("train", "test"):
            out = embed_root / task_name / side
            marker = {"checkpoint_sha256": checkpoint_sha, "random_init": random_init, "seed": args.seed,
                      "manifest": task[side], "manifest_sha256": sha256_file(Path(task[side])),
                      "image_size": size, "volume_size": volume_size}
            marker_path = out / "representation_quality.json"
            if not (marker_path.is_file() and read_json(marker_path) == marker and (out / "features.safetensors").is_file()):
                command = [jointssl_exe(), "embed", "--pretrained", str(checkpoint), "--seed", str(args.seed),
                           "--output", str(out), "--image-size", str(size), "--volume-size", str(volume_size),
                           "--device", "cpu", "--quiet", "--overwrite",
                           "--volumes" if task["kind"] == "volumes" else "--images", task[side]]
                if random_init:
                    command.insert(4, "--random-init")
                rc = run_logged(command, embed_root / "embed.log", env)
                if rc != 0:
                    raise SystemExit(f"jointssl embed failed ({rc}) for {task_name}/{side}; log: {embed_root / 'embed.log'}")
                write_json(marker_path, marker)
            dirs[side] = out
        for feature in task["features"]:
            key = task_name if feature == task["features"][0] else f"{task_name}:{feature}"
            report = report_root / f"{key.replace(':', '__')}.json"
            stamp = (embed_root / task_name / "test" / "representation_quality.json").stat().st_mtime
            if not (report.is_file() and report.stat().st_mtime >= stamp):
                command = [jointssl_exe(), "evaluate", "--train", str(dirs["train"]), "--test", str(dirs["test"]),
                           "--task", key, "--feature", feature, "--seed", str(args.seed), "--report", str(report)]
                if task.get("group_regex"):
                    command += ["--group-regex", task["group_regex"]]
                if args.smoke:
                    command += ["--k", "3"]
                report.parent.mkdir(parents=True, exist_ok=True)
                rc = run_logged(command, report_root / "evaluate.log", env)
                if rc != 0 or not report.is_file():
                    raise SystemExit(f"jointssl evaluate failed ({rc}) for {key}; log: {report_root / 'evaluate.log'}")
            results[key] = {**read_json(report), "metric": task["metric"]}
            r = results[key]
            print(f"{name} {key}: linear acc {_fmt(r.get('linear_acc'))} kNN acc {_fmt(r.get('knn_acc'))} "
                  f"AUROC linear {_fmt(r.get('auroc_linear'))}")
    if args.with_segmentation or (args.tasks and "brain_tumour_segmentation" in args.tasks):
        results["brain_tumour_segmentation"] = segmentation(args, tasks, checkpoint, random_init)
    out = args.workdir / "results" / f"{name}.json"
    previous = read_json(out)["tasks"] if out.is_file() else {}
    merged = {
        "row": args.row, "seed": args.seed, "smoke": bool(args.smoke), "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_sha, "random_init": random_init, "checkpoint_from": source,
        "pretrain": _pretrain_summary(args.workdir, args.row, args.seed),
        "tasks": {**previous, **results},
    }
    write_json(out, merged)
    print(f"wrote {out}")


def _pretrain_summary(workdir: Path, row: str, seed: int) -> dict[str, Any] | None:
    path = workdir / f"{row}_seed{seed}" / "pretrain_info.json"
    if row == "random" or not path.is_file():
        return None
    info = read_json(path)
    return {k: info.get(k) for k in ("optimizer_steps", "wall_seconds", "train_seconds", "seconds_per_step", "compute")}


def segmentation(args: argparse.Namespace, tasks: dict[str, Any], checkpoint: Path, random_init: bool) -> dict:
    seg = tasks["segmentation"]
    steps = args.segmentation_steps or (SMOKE_SEGMENTATION_STEPS if args.smoke else SEGMENTATION_STEPS)
    root = args.workdir / "segmentation" / f"{args.row}_seed{args.seed}"
    result_path = root / "result.json"
    if result_path.is_file() and read_json(result_path).get("steps") == steps:
        return read_json(result_path)
    overrides = dict(SEGMENTATION_SCALE)
    if args.smoke:
        overrides.update({"data.init_args.in_plane_size": 32, "data.init_args.batch_size": 2,
                          "data.init_args.num_workers": 0})
    overrides.update({
        "seed_everything": args.seed,
        "trainer.default_root_dir": str(root),
        "trainer.max_steps": steps,
        "trainer.logger": "lightning.pytorch.loggers.CSVLogger",
        "trainer.logger.init_args.save_dir": str(root),
        "trainer.logger.init_args.name": "logs",
        "data.init_args.manifest": seg["train"],
        "data.init_args.val_manifest": seg["test"],
        "data.init_args.samples_per_epoch": steps * int(overrides["data.init_args.batch_size"]),
        "data.init_args.split_seed": args.seed,
        "model.init_args.pretrained": "null" if random_init else str(checkpoint),
    })
    if root.exists():
        shutil.rmtree(root)  # an unfinished run: start again (it is short)
    env = subprocess_env(args.threads)
    command = [jointssl_exe(), "fit", "--config", seg["config"], *cli_args(overrides)]
    started = time.time()
    rc = run_logged(command, root / "segmentation.log", env)
    seconds = time.time() - started
    if rc != 0:
        raise SystemExit(f"segmentation failed ({rc}); log: {root / 'segmentation.log'}")
    metrics = {}
    for path in sorted(root.glob("logs/**/metrics.csv")):
        for row in read_csv(path):
            for key, value in row.items():
                if key.startswith("val/") and value not in ("", None):
                    metrics[key] = float(value)
    result = {"task": "brain_tumour_segmentation", "dice": metrics.get("val/dice"), "metrics": metrics,
              "steps": steps, "seconds": round(seconds, 1), "random_init": random_init,
              "pretrained": None if random_init else str(checkpoint), "overrides": overrides, "metric": "dice"}
    write_json(result_path, result)
    print(f"segmentation {args.row}: Dice {_fmt(result['dice'])} ({steps} steps, {seconds:.0f} s)")
    return result


# ================================================================================================ table
TABLE_TASKS = (
    ("cxr_pneumonia", "CXR pneumonia"),
    ("brain_tumour_class", "brain tumour class"),
    ("slices2d_dataset", "slices2d dataset"),
    ("brats_sequence", "BraTS sequence"),
    ("volume_sequence", "volume seq. (f_inter)"),
    ("volume_sequence:slice_mean", "volume seq. (slice mean)"),
)


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cmd_table(args: argparse.Namespace) -> None:
    results_dir = args.workdir / "results"
    by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(results_dir.glob("*_seed*.json")):
        result = read_json(path)
        by_row[result["row"]].append(result)
    if not by_row:
        raise SystemExit(f"no results in {results_dir}: run `evaluate` first")
    with_seg = any("brain_tumour_segmentation" in r["tasks"] for rs in by_row.values() for r in rs)
    header = ["encoder", "seeds", "pretrain steps", "pretrain min"]
    header += [f"{title} ({'linear AUROC' if key == 'cxr_pneumonia' else 'linear acc'} / kNN acc)"
               for key, title in TABLE_TASKS]
    if with_seg:
        header.append("tumour seg. Dice")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    order = [r for r in ROWS if r in by_row] + sorted(set(by_row) - set(ROWS))
    for row in order:
        results = sorted(by_row[row], key=lambda r: r["seed"])
        steps = [r["pretrain"]["optimizer_steps"] for r in results if r.get("pretrain")]
        minutes = [r["pretrain"]["wall_seconds"] / 60 for r in results if r.get("pretrain")]
        cells = [row, str(len(results)), _cell(steps, 0), _cell(minutes, 1)]
        for key, _ in TABLE_TASKS:
            reports = [r["tasks"][key] for r in results if key in r["tasks"]]
            primary = "auroc_linear" if key == "cxr_pneumonia" else "linear_acc"
            linear = _cell([x[primary] for x in reports if x.get(primary) is not None])
            knn = _cell([x["knn_acc"] for x in reports if x.get("knn_acc") is not None])
            cells.append("-" if linear == knn == "-" else f"{linear} / {knn}")
        if with_seg:
            dice = [r["tasks"]["brain_tumour_segmentation"]["dice"] for r in results
                    if (r["tasks"].get("brain_tumour_segmentation") or {}).get("dice") is not None]
            cells.append(_cell(dice))
        lines.append("| " + " | ".join(cells) + " |")
    smoke = any(r.get("smoke") for rs in by_row.values() for r in rs)
    notes = [
        "",
        "Cells: linear probe / kNN (`jointssl evaluate` on frozen embeddings, probe-train -> probe-test; every split "
        "in tasks.json); one seed: its value, several: mean ± standard deviation over the seeds. pretrain min: wall "
        "time of `jointssl fit` (all stages for staged_swav).",
    ]
    if smoke:
        notes.append("SMOKE RUN: tiny settings, the numbers mean nothing.")
    text = "\n".join(lines + notes) + "\n"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "table.md").write_text(text)
    print(text)
    print(f"wrote {results_dir / 'table.md'}")


def _cell(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1 or len(set(values)) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# ================================================================================================ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None,
                        help=f"default {DEFAULT_WORKDIR.relative_to(REPO_ROOT)} "
                             f"({SMOKE_WORKDIR.relative_to(REPO_ROOT)} with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings everywhere (a test of the plumbing)")
    # One torch thread: on 2 cores shared with DataLoader workers (and other jobs), a 2-thread OpenMP team waits
    # at every barrier for a descheduled thread (see benchmarks/README.md, bench_cxr_probe).
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every jointssl subprocess")
    parser.add_argument("--quiet", action="store_true", help="subprocess output only into the logs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="manifests and tasks.json")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the reference data folder (../shared/data)")
    p = sub.add_parser("pretrain", help="pretrain one row")
    p.add_argument("row", choices=PRETRAIN_ROWS)
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS}; smoke "
                                                           f"{SMOKE_STEPS}); staged_swav: in total")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="only check the overrides with `jointssl fit --print_config` and print the command(s)")
    p = sub.add_parser("evaluate", help="embed + evaluate one row on every task")
    p.add_argument("row", choices=ROWS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks of tasks.json")
    p.add_argument("--with-segmentation", action="store_true",
                   help="also fine-tune configs/downstream/seg_brain_tumor.yaml (brain_tumour_segmentation)")
    p.add_argument("--segmentation-steps", type=int, default=None,
                   help=f"optimizer steps of the segmentation fine-tuning (default {SEGMENTATION_STEPS}; smoke "
                        f"{SMOKE_SEGMENTATION_STEPS})")
    sub.add_parser("table", help="merge the results into results/table.md")
    args = parser.parse_args(argv)
    if args.workdir is None:
        args.workdir = SMOKE_WORKDIR if args.smoke else DEFAULT_WORKDIR
    args.workdir = Path(args.workdir).resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    global QUIET
    args = parse_args(argv)
    QUIET = args.quiet
    args.workdir.mkdir(parents=True, exist_ok=True)
    {"prepare": cmd_prepare, "pretrain": cmd_pretrain, "evaluate": cmd_evaluate, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()

"""Does a short jointssl pretraining help chest X-ray classification? Linear probe and fine-tuning, each from random
initialisation and from a demo-scale pretraining on the same images.

Data: the 1000 Kermany chest X-rays (NORMAL vs PNEUMONIA) of ../shared/data/cxr/train, split once into train /
val with ImageClassificationData (val_fraction 0.2, seed 0, patient-grouped by the Kermany file names, stratified by
class). The pretraining sees the *training split's* images only (no labels, no validation image).

1. Pretraining: `jointssl fit --config <OUT>/pretrain_cxr.yaml`, a copy of configs/demo.yaml (joint SwAV objective,
   resnet10t, d_model 128) whose 2D source is a CSV manifest of the training-split images instead of the synthetic
   data (no volumes, so only L_intra is active), for `--pretrain-steps` optimizer steps; everything else (model,
   SwAV settings, 2 x 48 px global + 2 x 24 px local crops, batch 32) is demo.yaml's, except the
   learning rate: LARS base_lr 0.6 (`--pretrain-base-lr`; lr 0.6 x 32/256), not the demo's 4.8, which collapses
   f_intra on these images (issue 10); and the demo's online kNN on its own images is dropped. The derived YAML is
   written to <OUT> and its differences from demo.yaml are printed.
2. Downstream (ImageClassifier, binary, balanced class weights, the same data module for every run), both on the
   downstream family's one recipe (AdamW, warm-up then cosine; jointssl.downstream.base): linear probe (lr 1e-3, no
   weight decay, no warm-up, as configs/downstream/cxr_linear.yaml) and fine-tuning (lr 1e-3, weight decay 0.05,
   0.5 epoch warm-up), 64 px inputs, batch 32, each from `pretrained=None` (random init of the same
   architecture) and from the pretraining checkpoint. Each run is seeded identically. The reported numbers are
   the validation metrics after the last epoch (no model selection on the validation set).

    .venv/bin/python benchmarks/bench_cxr_probe.py                      # the recorded run (benchmarks/README.md)
    .venv/bin/python benchmarks/bench_cxr_probe.py --pretrain-steps 5 --linear-epochs 1 --finetune-epochs 1
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from jointssl.checkpointing import write_json
from jointssl.cli import main as jointssl_main
from jointssl.downstream import ImageClassificationData, ImageClassifier

REPO_ROOT = Path(__file__).resolve().parents[1]
KERMANY_PATIENT = r"^(person\d+|(?:NORMAL2-)?IM-\d+)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data" / "cxr" / "train"))
    parser.add_argument("--out", default="runs/bench_cxr_probe")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument("--pretrain-base-lr", type=float, default=0.6, help="LARS base_lr per 256 images")
    parser.add_argument("--linear-epochs", type=int, default=10)
    parser.add_argument("--linear-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    # One thread: on 2 cores shared with other jobs, a 2-thread OpenMP team waits at every barrier for a descheduled
    # thread (measured: resnet10t, 32 x 64 px forward + backward, 0.27 s with 1 thread vs 2.3 s with 2).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def split(args: argparse.Namespace) -> ImageClassificationData:
    data = ImageClassificationData(
        train=args.data, task="binary", classes=["NORMAL", "PNEUMONIA"], val_fraction=0.2, seed=args.seed,
        group_regex=KERMANY_PATIENT, image_size=args.image_size, batch_size=args.batch_size,
        num_workers=args.num_workers, validation_threads=2,
    )
    data.setup("fit")
    return data


def pretrain_config(args: argparse.Namespace, manifest: Path, out: Path) -> tuple[dict[str, Any], list[str]]:
    """configs/demo.yaml with the CXR training images as the only source; returns the config and its changes."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    root = out / "pretrain"
    changes = {
        # max_steps ends the run. max_epochs stays finite: with -1 Lightning does not load the data before
        # configure_optimizers, and the 0.5-epoch warm-up cannot be converted into steps.
        "trainer.max_epochs": 1000,
        "trainer.max_steps": args.pretrain_steps,
        "trainer.default_root_dir": str(root),
        "trainer.logger.init_args.save_dir": str(root),
        "trainer.callbacks[0].init_args.dirpath": str(root / "checkpoints"),
        "trainer.enable_progress_bar": False,
        "data.init_args.synthetic": None,
        "data.init_args.images": [str(manifest)],
        "data.init_args.batch_size": args.pretrain_batch_size,
        "data.init_args.num_workers": args.num_workers,
        "seed_everything": args.seed,
        # The benchmark's own learning rate, not the demo's: demo.yaml's base_lr went 0.6 -> 4.8 (45871dc) for the
        # synthetic joint demo, and on these 2D-only CXR crops (64 prototypes, no queue, batch 32) lr 0.6 drives
        # L_intra to ln 64 within ~30 steps and collapses f_intra (effective rank 15.7 -> 5.4 over 300 steps, linear
        # probe 0.973 -> 0.834). 0.6 x 32 / 256 = 0.075 is the recipe benchmarks/README.md records (issue 10).
        "model.init_args.base_lr": args.pretrain_base_lr,
    }
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.replace("[0]", ".0").split(".")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[leaf] = value
    # The demo's online kNN reads the demo's own labelled images (demo_data/images): nothing to do with this run.
    config["trainer"]["callbacks"] = [
        callback for callback in config["trainer"]["callbacks"]
        if not callback["class_path"].endswith("OnlineKNNEvaluation")
    ]
    notes = [f"{k}: {json.dumps(v)}" for k, v in changes.items()]
    return config, notes + ["trainer.callbacks: without OnlineKNNEvaluation"]


def pretrain(args: argparse.Namespace, train_paths: list[str], out: Path) -> tuple[Path, float]:
    manifest = out / "pretrain_images.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path"])
        writer.writerows([p] for p in train_paths)
    config, changes = pretrain_config(args, manifest, out)
    config_path = out / "pretrain_cxr.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print("pretraining = configs/demo.yaml with:\n  " + "\n  ".join(changes), flush=True)
    print(f"$ jointssl fit --config {config_path}", flush=True)
    started = time.perf_counter()
    jointssl_main(["fit", "--config", str(config_path)])
    checkpoint = out / "pretrain" / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        raise RuntimeError(f"pretraining wrote no {checkpoint}")
    return checkpoint, time.perf_counter() - started


def downstream(
    args: argparse.Namespace, data: ImageClassificationData, mode: str, pretrained: Path | None, out: Path
) -> dict[str, float]:
    seed_everything(args.seed, workers=True)
    linear = mode == "linear"
    model = ImageClassifier(
        num_classes=2, task="binary", pretrained=str(pretrained) if pretrained else None, backbone="resnet10t",
        d_model=128, mode=mode, lr=args.linear_lr if linear else args.finetune_lr,
        weight_decay=0.0 if linear else 0.05, warmup_epochs=0.0 if linear else 0.5, class_weights="balanced",
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, max_epochs=args.linear_epochs if linear else args.finetune_epochs,
        default_root_dir=out, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(model, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = split(args)
    counts = {split_name: torch.bincount(data._require(split_name).targets, minlength=2).tolist()
              for split_name in ("train", "val")}
    print(f"split (NORMAL, PNEUMONIA): train {counts['train']}, val {counts['val']}", flush=True)
    checkpoint, pretrain_seconds = pretrain(args, data.train_paths, out)
    print(f"pretraining: {args.pretrain_steps} steps in {pretrain_seconds:.0f} s -> {checkpoint}", flush=True)

    rows = []
    for mode in ("linear", "finetune"):
        for init, pretrained in (("random", None), ("jointssl", checkpoint)):
            metrics = downstream(args, data, mode, pretrained, out / f"{mode}_{init}")
            rows.append({"mode": mode, "init": init, **metrics})
            print(f"{mode:8s} {init:8s} " + json.dumps({k: round(v, 4) for k, v in metrics.items()}), flush=True)

    write_json(out / "results.json", {"args": vars(args), "split": counts, "rows": rows})
    header = "| mode | init | epochs | val AUROC | val accuracy | val F1 | seconds |"
    print("\n" + header + "\n|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        epochs = args.linear_epochs if row["mode"] == "linear" else args.finetune_epochs
        print(f"| {row['mode']} | {row['init']} | {epochs} | {row['val/auroc']:.4f} | {row['val/accuracy']:.4f} | "
              f"{row['val/f1']:.4f} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()

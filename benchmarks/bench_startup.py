"""Time to the first training step, first start vs restart, for 1k, 10k and 100k small PNG images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_startup.py [--sizes 1000 10000 100000] [--threads 2]

Every start runs in a fresh process: ``Trainer.fit`` (CPU, max_steps=1) of a tiny JointSSL (timm ``test_resnet``)
on a ``JointDataModule`` over N generated 32x32 grey PNGs, measured from the call of ``fit`` to the start of the
first training batch (a callback's ``on_train_batch_start``): discovery, the decode-every-image validation of
``setup``, the data loader and the first batch, plus Lightning's and the model's own set-up. Imports are not
counted (they are the same for both starts). The first start begins with an empty run directory; the restart
is the same command again, as after a Slurm requeue, and finds the validation cache the first start wrote in
``<default_root_dir>/validation_cache``. Each start also reports how many images it decoded to validate them.

The images are generated once under ``runs/bench_startup/images/<N>/`` (1000 per subfolder; generation is not
timed), the run directories are ``runs/bench_startup/run_<N>/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "runs" / "bench_startup"
IMAGE_SIDE = 32
PER_FOLDER = 1000
TINY_MODEL = {
    "backbone": "test_resnet",
    "d_model": 32,
    "projection_hidden_dim": 32,
    "projection_dim": 16,
    "num_prototypes": [8],
    "warmup_epochs": 0,
}


def generate_images(count: int) -> Path:
    """``count`` random 32x32 grey PNGs under ``ROOT/images/<count>`` (once: a marker file records completion)."""
    import numpy as np
    from PIL import Image

    folder = ROOT / "images" / str(count)
    marker = folder / ".complete"  # hidden: image discovery skips it
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(count)
    for index in range(count):
        subfolder = folder / f"{index // PER_FOLDER:04d}"
        if index % PER_FOLDER == 0:
            subfolder.mkdir(parents=True)
        pixels = rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        Image.fromarray(pixels).save(subfolder / f"{index:07d}.png")
    marker.write_text(f"{count}\n")
    return folder


def start(images: Path, run_dir: Path, threads: int) -> dict:
    """One start in this process (``--start``): fit one step; return the seconds to the first batch and the
    images decoded for validation."""
    from lightning.pytorch import Callback, Trainer

    from jointssl.data import JointDataModule, validation
    from jointssl.pretrain import JointSSL

    decoded = []
    decode = validation.decode_image_2d
    validation.decode_image_2d = lambda path: decoded.append(path) or decode(path)

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.reached = time.perf_counter()

    first_batch = FirstBatch()
    data = JointDataModule(
        images=[str(images)], batch_size=64, num_workers=0, persistent_workers=False, global_crop_size=IMAGE_SIDE,
        local_crop_size=16, num_local_crops=0, validation_threads=threads,
    )
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=1, default_root_dir=run_dir, logger=False, callbacks=[first_batch],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    model = JointSSL(**TINY_MODEL)
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return {"seconds": first_batch.reached - began, "decoded": len(decoded), "images": data.dataset_size}


def measure(count: int, threads: int) -> tuple[dict, dict]:
    """The first start (empty run directory) and the restart for ``count`` images, each in its own process."""
    images = generate_images(count)
    run_dir = ROOT / f"run_{count}"
    shutil.rmtree(run_dir, ignore_errors=True)
    results = []
    for _ in range(2):
        command = [sys.executable, __file__, "--start", str(images), str(run_dir), "--threads", str(threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    return results[0], results[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--threads", type=int, default=2, help="validation_threads of the data module")
    parser.add_argument("--start", nargs=2, metavar=("IMAGES", "RUN_DIR"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.start:
        import logging
        import warnings

        logging.disable(logging.WARNING)  # Lightning's hints; the output is the JSON line
        warnings.simplefilter("ignore")
        print(json.dumps(start(Path(options.start[0]), Path(options.start[1]), options.threads)))
        return
    print("| images | first start (s) | decoded | restart (s) | decoded | restart / first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for count in options.sizes:
        first, again = measure(count, options.threads)
        ratio = again["seconds"] / first["seconds"]
        print(
            f"| {count:,} | {first['seconds']:.2f} | {first['decoded']:,} | {again['seconds']:.2f} | "
            f"{again['decoded']:,} | {ratio:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

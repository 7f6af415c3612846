"""Example images of pretraining, logged at an interval: what the augmentations feed the model and what the 2D
prototypes group together.

Three montages per logging step (grayscale, each tile min-max scaled on its own):
- `examples/crops`: one row per 2D sample, its crops left to right (global crops, then local crops upscaled to
  the global size);
- `examples/volume_views`: per volume, slices of view s (left block) and of view t (right block), same positions;
- `examples/clusters`: one row per prototype, the samples of the batch whose first global crop is nearest to it
  (head 0 of the 2D task; the most populated prototypes of the batch, in eval mode).

W&B loggers receive them through `log_image` (a "Media" panel per key). Without a W&B logger (CSV, no logger) they
are written as PNG files to `<default_root_dir>/example_images/<name>_step<step>.png`, so a CSV-only run can be
inspected too (`save_png` changes this).

    jointssl fit --config configs/demo.yaml --trainer.logger+=configs/logger/wandb.yaml \
        --trainer.callbacks+=jointssl.callbacks.example_images.ExampleImageLogger --trainer.callbacks.every_n_steps=200
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid


#: Pixels between tiles, and between the two view blocks of a volume montage.
TILE_PADDING = 2
#: Images of one key (HxWx3 uint8 arrays) and their captions.
Montages = tuple[list[np.ndarray], list[str]]


class ExampleImageLogger(Callback):
    """Log example 2D crops, volume view montages and cluster grids every `every_n_steps` optimizer steps.

    Cheap by construction: runs on global rank 0 only, at the interval only, under `no_grad`, with the model in
    eval mode (no BatchNorm statistics update, no SyncBatchNorm collective, no random numbers drawn, so training is
    unchanged) for the one extra encoder pass the cluster grid needs; the montages are built on the CPU.

    Args:
        every_n_steps: log at global steps 0, n, 2n, ... (the images are of the batch that trains that step).
        max_images: most 2D samples in the crop montage, slices per view in a volume montage, and samples per
            prototype row in the cluster grid.
        max_volumes: most volumes (montages) per logging step.
        num_clusters: prototype rows in the cluster grid.
        save_png: write PNGs to `<default_root_dir>/example_images/`; None: only when no W&B logger is attached.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        max_images: int = 16,
        max_volumes: int = 2,
        num_clusters: int = 4,
        save_png: bool | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("every_n_steps", every_n_steps), ("max_images", max_images),
                            ("max_volumes", max_volumes), ("num_clusters", num_clusters)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self.max_volumes = max_volumes
        self.num_clusters = num_clusters
        self.save_png = save_png
        self._last_logged_step = -1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches share a global step: log the first of them only.
        if not trainer.is_global_zero or step % self.every_n_steps != 0 or step == self._last_logged_step:
            return
        self._last_logged_step = step
        montages = self.montages(pl_module, batch)
        if montages:
            self.publish(trainer, montages, step)

    # ------------------------------------------------------------------ building
    @torch.no_grad()
    def montages(self, pl_module: LightningModule, batch: dict[str, Any]) -> dict[str, Montages]:
        """{key: (images as HxWx3 uint8 arrays, captions)} for the streams present in `batch`."""
        out: dict[str, Montages] = {}
        images = batch.get("images")
        if images is not None:
            crops = [crop[: self.max_images] for crop in images["crops"]]
            out["examples/crops"] = (
                [crops_montage(crops)],
                [f"{crops[0].shape[0]} samples x {len(crops)} crops"],
            )
            grid = self._cluster_grid(pl_module, images["crops"][0])
            if grid is not None:
                out["examples/clusters"] = grid
        volumes = batch.get("volumes")
        if volumes is not None:
            views, padding = volumes["views"], volumes["padding_mask"]
            count = min(self.max_volumes, views.shape[0])
            montages = [volume_views_montage(views[i], ~padding[i], self.max_images) for i in range(count)]
            sources = volumes.get("source") or [""] * count
            captions = [f"view s | view t  {sources[i]}".rstrip() for i in range(count)]
            out["examples/volume_views"] = (montages, captions)
        return out

    def _cluster_grid(self, pl_module: LightningModule, crop: Tensor) -> Montages | None:
        intra = getattr(pl_module, "intra", None)
        encoder = getattr(pl_module, "encoder", None)
        if intra is None or encoder is None or crop.shape[0] == 0:
            return None
        assignments = nearest_prototypes(pl_module, crop)
        grid, caption = cluster_grid(crop, assignments, self.num_clusters, self.max_images)
        return [grid], [caption]

    # ------------------------------------------------------------------ publishing
    def publish(self, trainer: Trainer, montages: dict[str, Montages], step: int) -> None:
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for logger in wandb_loggers:
            for key, (images, captions) in montages.items():
                logger.log_image(key=key, images=images, step=step, caption=captions)
        save_png = self.save_png if self.save_png is not None else not wandb_loggers
        if save_png:
            folder = Path(trainer.default_root_dir) / "example_images"
            folder.mkdir(parents=True, exist_ok=True)
            for key, (images, _) in montages.items():
                name = key.split("/")[-1]
                for i, image in enumerate(images):
                    suffix = f"_{i}" if len(images) > 1 else ""
                    Image.fromarray(image).save(folder / f"{name}{suffix}_step{step:07d}.png")


@torch.no_grad()
def nearest_prototypes(pl_module: LightningModule, images: Tensor) -> Tensor:
    """Head-0 2D prototype nearest to each image's projected embedding ([B] long, on the CPU).

    Runs the encoder and the 2D projection head in eval mode and restores every submodule's mode afterwards."""
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    try:
        weight = next(pl_module.encoder.parameters())
        # The module's device and dtype (bf16-true runs keep bf16 weights; the crops arrive in float32).
        features = pl_module.encoder(images.to(device=weight.device, dtype=weight.dtype))
        embeddings = pl_module.intra.project(features)
        head = pl_module.intra.prototypes.heads[0]
        scores = F.linear(embeddings.to(head.weight.dtype), head.weight)
        return scores.argmax(dim=1).cpu()
    finally:
        for module, training in modes.items():
            module.training = training


def crops_montage(crops: list[Tensor]) -> np.ndarray:
    """One row per sample, its crops left to right; smaller (local) crops upscaled to the first crop's size."""
    size = crops[0].shape[-2:]
    resized = [
        crop if crop.shape[-2:] == size else F.interpolate(crop.float(), size=tuple(size), mode="nearest")
        for crop in crops
    ]
    tiles = torch.stack(resized, dim=1).flatten(0, 1)  # [B * crops, 1, h, w], row-major by sample
    return _grid(tiles, ncols=len(crops))


def volume_views_montage(views: Tensor, real: Tensor, max_slices: int) -> np.ndarray:
    """Slices of view s (left block) and view t (right block) of one volume, at the same evenly spaced real slice
    positions. `views`: [2, N, 1, H, W]; `real`: [N] bool (False: padding)."""
    positions = real.nonzero().flatten()
    if positions.numel() > max_slices:
        positions = positions[torch.linspace(0, positions.numel() - 1, max_slices).round().long()]
    ncols = max(1, int(np.ceil(np.sqrt(positions.numel()))))
    blocks = [_grid(views[v, positions], ncols=ncols) for v in range(2)]
    gap = np.zeros((blocks[0].shape[0], 3 * TILE_PADDING, 3), dtype=np.uint8)
    return np.concatenate([blocks[0], gap, blocks[1]], axis=1)


def cluster_grid(
    images: Tensor, assignments: Tensor, num_clusters: int, max_members: int
) -> tuple[np.ndarray, str]:
    """Rows of the samples assigned to the most populated prototypes (most populated first), blank tiles padding
    short rows; returns the grid and a caption naming each row's prototype and its member count."""
    images = images.detach().float().cpu()
    counts = torch.bincount(assignments, minlength=1)
    top = counts.argsort(descending=True, stable=True)[:num_clusters]
    top = top[counts[top] > 0]
    width = min(max_members, int(counts[top[0]]))  # the largest row: no all-blank columns
    rows: list[Tensor] = []
    for prototype in top:
        members = images[assignments == prototype][:width]
        blank = members.new_zeros(width - members.shape[0], *members.shape[1:])
        rows.append(torch.cat([members, blank]))
    caption = "; ".join(f"prototype {int(p)}: {int(counts[p])}" for p in top)
    return _grid(torch.cat(rows), ncols=width), caption


def _grid(tiles: Tensor, ncols: int) -> np.ndarray:
    """Tiles [n, 1, h, w] -> HxWx3 uint8, each tile min-max scaled on its own (blank tiles stay black)."""
    grid = make_grid(tiles.detach().float().cpu(), nrow=ncols, padding=TILE_PADDING, normalize=True, scale_each=True)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()

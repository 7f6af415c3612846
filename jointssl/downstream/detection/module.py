"""Lung nodule detection: MONAI's 3D RetinaNet whose ResNet backbone is the pretrained 2D f_intra, inflated to 3D.

The network follows MONAI's LUNA16 detection tutorial (``luna16_training.py``): a ResNet + FPN feature extractor,
``RetinaNet`` heads, ``AnchorGeneratorWithAnchorShape``, and ``RetinaNetDetector`` with an ATSS matcher, a hard
negative sampler, score threshold / NMS box selection and a sliding-window inferer for whole volumes. The
difference is the backbone: the timm ResNet of the pretrained slice encoder, inflated to 3D by the rule of
:mod:`jointssl.downstream.inflate` (2D kernels reoriented to the RAS volume axes, then repeated along depth and
divided by it (``inflation="mean"``, I3D) or put at the central depth (``"center"``); BatchNorm statistics copied).
``returned_layers`` (1-based ResNet stages, the tutorial's ``[1, 2]``) feed MONAI's ``FeaturePyramidNetwork`` with
an extra max-pooled level; the stages after the last returned one are dropped.

``pretrained=None`` builds the same architecture from the named timm ``backbone`` with freshly initialised 3D
convolutions. ``mode="linear"`` freezes the inflated backbone (eval mode, BatchNorm statistics fixed) and trains
the FPN and the heads only: the detection analogue of a linear probe.

Validation runs the detector on whole volumes and logs, over all validation scans (gathered across ranks),
``val/froc_cpm`` (mean sensitivity at 1/8 .. 8 FPs per scan), ``val/sensitivity_fp{rate}`` and MONAI's COCO
``val/AP_IoU_0.10_MaxDet_100`` etc. (:mod:`jointssl.downstream.detection.metrics`), and draws the FROC curve
(``froc`` figure). Prediction gives each scan's candidates in world millimetres (written as a LUNA16 submission CSV
by the prediction writer).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from torch import Tensor, nn

from jointssl.callbacks.figures import froc_figure
from jointssl.distributed import all_gather_cat, rank
from jointssl.downstream.base import DownstreamTask, Mode, check_mode
from jointssl.downstream.detection.data import boxes_to_world
from jointssl.downstream.detection.metrics import FROC_FP_RATES, evaluate_detections
from jointssl.downstream.detection.network import build_feature_extractor
from jointssl.downstream.inflate import InflationRule

log = logging.getLogger("jointssl.downstream")


class ScanDetections(NamedTuple):
    """One evaluated scan: its dataset index, detections (boxes ``[n, 6]``, scores ``[n]``), ground truth."""

    index: int
    boxes: np.ndarray
    scores: np.ndarray
    gt_boxes: np.ndarray


def gather_scan_detections(scans: Sequence[ScanDetections], device: torch.device) -> list[ScanDetections]:
    """Every rank's evaluated scans, each scan once, sorted by dataset index (identity in a single process).

    A DistributedSampler repeats scans to even out the shards: every evaluated copy is tagged with its origin
    (rank, position on that rank) and only the first copy of each scan is kept. The collectives run on ``device``
    (NCCL needs CUDA tensors, gloo CPU tensors).
    """
    origins = [(float(scan.index), float(rank()), float(position)) for position, scan in enumerate(scans)]
    origin_rows = np.array(origins, dtype=np.float64).reshape(-1, 3)
    pred_rows = np.concatenate([np.zeros((0, 10))] + [
        np.concatenate([np.tile(o, (len(s.scores), 1)), s.boxes, s.scores[:, None]], axis=1)
        for o, s in zip(origins, scans)
    ])
    gt_rows = np.concatenate([np.zeros((0, 9))] + [
        np.concatenate([np.tile(o, (len(s.gt_boxes), 1)), s.gt_boxes], axis=1) for o, s in zip(origins, scans)
    ])
    origin_rows, pred_rows, gt_rows = (
        all_gather_cat(torch.from_numpy(rows).to(device)).cpu().numpy() for rows in (origin_rows, pred_rows, gt_rows)
    )
    first_copy: dict[int, tuple[float, float, float]] = {}
    for origin in map(tuple, origin_rows):
        index = int(origin[0])
        first_copy[index] = min(first_copy.get(index, origin), origin)
    gathered = []
    for index in sorted(first_copy):
        preds, gts = _rows_of(pred_rows, first_copy[index]), _rows_of(gt_rows, first_copy[index])
        gathered.append(ScanDetections(index, preds[:, :6], preds[:, 6], gts))
    return gathered


def _rows_of(rows: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    """The rows of one evaluated copy (the first three columns are its origin), without the origin columns."""
    return rows[np.all(rows[:, :3] == np.asarray(origin), axis=1), 3:]


class NoduleDetector(DownstreamTask):
    """3D RetinaNet nodule detector (MONAI) with a backbone inflated from the pretrained 2D slice encoder.

    Args:
        pretrained: a jointssl pretraining checkpoint or export folder; its f_intra backbone is inflated to 3D and
            its architecture overrides ``backbone``. None: ``backbone`` randomly initialised.
        backbone: timm ResNet name for ``pretrained=None`` (``resnet50``, ``resnet18``, ``test_resnet``, ...).
        mode: "finetune" trains everything; "linear" freezes the backbone (FPN and heads are trained).
        inflation: "mean" (I3D: kernel repeated along depth / depth) or "center" (kernel at the central depth).
        stem_depth_stride: depth stride of the stem's first convolution (the tutorial's ``conv1_t_stride[2]``).
        returned_layers: ResNet stages feeding the FPN (plus one max-pooled level), as in the tutorial.
        fpn_channels: FPN and head width (a multiple of 8: the heads use GroupNorm with 8 groups).
        base_anchor_shapes: anchor sizes in voxels (x, y, z) at the finest FPN level (doubled per level).
        atss_num_candidates: ATSS matcher candidates per level.
        hard_negative_batch_size, positive_fraction: hard negative sampler of the classification loss.
        score_thresh, nms_thresh, topk_candidates_per_level, detections_per_image: box selection at inference.
        val_patch_size: sliding-window size for volumes with more voxels than it holds (tutorial: 512x512x208);
            None always runs on the whole volume. Must be a multiple of the network's ``size_divisible``.
        sw_overlap: sliding-window overlap.
        cls_loss_weight: weight of the classification loss against the box regression loss.
        iou_threshold: IoU for a detection to hit a nodule (tutorial: 0.1).
        fp_rates: FPs per scan at which the FROC sensitivity is reported.
        lr, momentum, weight_decay: SGD with Nesterov momentum (tutorial: 1e-2, 0.9, 3e-5); see
            :meth:`configure_optimizers` for why detection keeps the tutorial's optimiser.
        warmup_epochs, lr_step_epochs, lr_gamma: linear warm-up, then the lr is multiplied by ``lr_gamma`` every
            ``lr_step_epochs`` epochs (tutorial: 10, 150, 0.1).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        backbone: str = "resnet50",
        mode: Mode = "finetune",
        inflation: InflationRule = "mean",
        stem_depth_stride: int = 1,
        returned_layers: Sequence[int] = (1, 2),
        fpn_channels: int = 256,
        base_anchor_shapes: Sequence[Sequence[int]] = ((6, 8, 4), (8, 6, 5), (10, 10, 6)),
        atss_num_candidates: int = 4,
        hard_negative_batch_size: int = 64,
        positive_fraction: float = 0.3,
        score_thresh: float = 0.02,
        nms_thresh: float = 0.22,
        topk_candidates_per_level: int = 1000,
        detections_per_image: int = 100,
        val_patch_size: Sequence[int] | None = (512, 512, 208),
        sw_overlap: float = 0.25,
        cls_loss_weight: float = 1.0,
        iou_threshold: float = 0.1,
        fp_rates: Sequence[float] = FROC_FP_RATES,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 3e-5,
        warmup_epochs: int = 10,
        lr_step_epochs: int = 150,
        lr_gamma: float = 0.1,
    ) -> None:
        super().__init__()
        check_mode(mode)
        if fpn_channels % 8:
            raise ValueError(f"fpn_channels must be a multiple of 8 (GroupNorm(8) in the heads), got {fpn_channels}")
        if any(len(shape) != 3 for shape in base_anchor_shapes):
            raise ValueError(f"base_anchor_shapes must be (x, y, z) voxel sizes, got {base_anchor_shapes}")
        self.save_hyperparameters()
        if pretrained is not None:
            # The architecture comes from the file (`backbone` is overridden), and the hyper-parameters become
            # self-contained: `load_from_checkpoint` rebuilds the module without the pretraining file.
            encoder, _ = self.build_pretrained(pretrained, backbone, None)
            backbone_2d = encoder.backbone
        else:
            backbone_2d = timm.create_model(backbone, features_only=True, in_chans=1)
        feature_extractor, self.size_divisible = build_feature_extractor(
            backbone_2d, returned_layers, fpn_channels, inflation, stem_depth_stride, reinitialise=pretrained is None
        )
        if val_patch_size is not None and any(p % d for p, d in zip(val_patch_size, self.size_divisible)):
            raise ValueError(f"val_patch_size {list(val_patch_size)} must be a multiple of {self.size_divisible}")
        anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=[2**level for level in range(len(returned_layers) + 1)],
            base_anchor_shapes=[tuple(shape) for shape in base_anchor_shapes],
        )
        network = RetinaNet(
            spatial_dims=3,
            num_classes=1,
            num_anchors=anchor_generator.num_anchors_per_location()[0],
            feature_extractor=feature_extractor,
            size_divisible=self.size_divisible,
        )
        self.detector = RetinaNetDetector(network=network, anchor_generator=anchor_generator)
        self.detector.set_atss_matcher(num_candidates=atss_num_candidates, center_in_gt=False)
        self.detector.set_hard_negative_sampler(
            batch_size_per_image=hard_negative_batch_size, positive_fraction=positive_fraction, pool_size=20,
            min_neg=16,
        )
        self.detector.set_box_selector_parameters(
            score_thresh=score_thresh, topk_candidates_per_level=topk_candidates_per_level, nms_thresh=nms_thresh,
            detections_per_img=detections_per_image,
        )
        if val_patch_size is not None:
            self.detector.set_sliding_window_inferer(
                roi_size=list(val_patch_size), overlap=sw_overlap, sw_batch_size=1, mode="constant"
            )
        # Linear mode: the frozen BatchNorm statistics stay those of the pretrained encoder.
        self.freeze_pretrained()
        self._val_scans: list[ScanDetections] = []  # this rank's validation scans, on the CPU

    @property
    def pretrained_parts(self) -> list[nn.Module]:
        return [self.backbone]

    @property
    def backbone(self) -> nn.ModuleDict:
        """The inflated 3D ResNet stages (timm module names)."""
        return self.detector.network.feature_extractor.body

    def forward(self, images: list[Tensor] | Tensor, use_inferer: bool = False) -> list[dict[str, Tensor]]:
        """Detections per image (eval mode): ``boxes`` ``[n, 6]`` (x1, y1, z1, x2, y2, z2 in voxels),
        ``labels`` ``[n]`` and ``labels_scores`` ``[n]``."""
        return self.detector(images, use_inferer=use_inferer)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.detector(batch["images"], batch["targets"])
        cls_loss, box_loss = losses[self.detector.cls_key], losses[self.detector.box_reg_key]
        loss = self.hparams.cls_loss_weight * cls_loss + box_loss
        batch_size = len(batch["images"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_cls", cls_loss, batch_size=batch_size)
        self.log("train/loss_box_reg", box_loss, batch_size=batch_size)
        return loss

    def _detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        patch = self.hparams.val_patch_size
        # As the tutorial: sliding windows only when a volume is larger than the window.
        use_inferer = patch is not None and any(image[0].numel() > math.prod(patch) for image in images)
        return self.detector(images, use_inferer=use_inferer)

    def on_validation_epoch_start(self) -> None:
        self._val_scans = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        outputs = self._detect(batch["images"])
        for output, target, index in zip(outputs, batch["targets"], batch["indices"].tolist()):
            self._val_scans.append(ScanDetections(
                index,
                output[self.detector.target_box_key].detach().double().cpu().numpy().reshape(-1, 6),
                output[self.detector.pred_score_key].detach().double().cpu().numpy().reshape(-1),
                target["boxes"].detach().double().cpu().numpy().reshape(-1, 6),
            ))

    def on_validation_epoch_end(self) -> None:
        scans = gather_scan_detections(self._val_scans, self.device)
        self._val_scans = []
        if not scans:
            return
        metrics, froc = evaluate_detections(
            pred_boxes=[s.boxes for s in scans],
            pred_scores=[s.scores for s in scans],
            gt_boxes=[s.gt_boxes for s in scans],
            iou_threshold=self.hparams.iou_threshold,
            max_detections=self.hparams.detections_per_image,
            fp_rates=self.hparams.fp_rates,
        )
        # Every rank computed the same numbers from the gathered scans: no further reduction.
        for name, value in metrics.items():
            self.log(f"val/{name}", value, prog_bar=name == "froc_cpm")
        if np.isfinite(froc.cpm):
            self.draw_figure("froc", lambda: froc_figure(froc))

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Per scan: ``seriesuid``; ``boxes`` ``[n, 6]`` (voxels of the RAS-oriented, resampled volume);
        ``scores`` ``[n]``; ``centers`` ``[n, 3]`` and ``diameters`` ``[n]`` in world millimetres of the annotations'
        frame (the prediction writer writes them as a LUNA16 submission CSV)."""
        predictions = []
        for output, uid, affine in zip(self._detect(batch["images"]), batch["seriesuids"], batch["world_affines"]):
            boxes = output[self.detector.target_box_key].detach().double().cpu().numpy().reshape(-1, 6)
            centers, diameters = boxes_to_world(boxes, affine.cpu().numpy())
            predictions.append({
                "seriesuid": uid,
                "boxes": boxes,
                "scores": output[self.detector.pred_score_key].detach().double().cpu().numpy().reshape(-1),
                "centers": centers,
                "diameters": diameters,
            })
        return predictions

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD with Nesterov momentum, linear warm-up over ``warmup_epochs`` then a step decay per epoch: MONAI's
        LUNA16 RetinaNet recipe (``luna16_training.py``: ``SGD(lr=1e-2, momentum=0.9, weight_decay=3e-5,
        nesterov=True)``, ``StepLR(step_size=150, gamma=0.1)`` after a ``GradualWarmupScheduler`` of 10 epochs),
        not the family's AdamW + cosine (:class:`~jointssl.downstream.base.DownstreamTask`). The reason is the
        evidence: the tutorial's FROC results, which this task is compared against, were obtained with this
        schedule, and its anchors, ATSS matcher, hard-negative sampler and GroupNorm heads were tuned under it;
        an AdamW recipe would be a different, unvalidated detector. Parameters that do not require gradients
        (a frozen backbone in linear mode) are left out."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            parameters, lr=self.hparams.lr, momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay, nesterov=True,
        )
        warmup, step, gamma = self.hparams.warmup_epochs, self.hparams.lr_step_epochs, self.hparams.lr_gamma

        def factor(epoch: int) -> float:
            if epoch < warmup:
                return (epoch + 1) / warmup
            return gamma ** ((epoch - warmup) // step)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

"""Nodule detection metrics: FROC (sensitivity at 1/8 .. 8 false positives per scan) and MONAI's COCO metrics.

Matching follows MONAI's LUNA16 tutorial: :func:`monai.apps.detection.metrics.matching.matching_batch` with
``box_iou`` and the thresholds of ``COCOMetric(classes=["nodule"], iou_list=[0.1], max_detection=[100])``: per scan
the (at most 100) detections are visited from the highest score down and each is matched greedily to the
unmatched ground-truth box it overlaps most, if the IoU is at least the threshold (0.1 by default). A matched
detection is a true positive; every other detection is a false positive (also a second detection of an already
matched nodule: NMS removes most of them).

FROC, as in the LUNA16 evaluation script the tutorial uses (``noduleCADEvaluationLUNA16.computeFROC``): for every
distinct score threshold t, ``FPs/scan(t) = #FP with score >= t / #scans`` and ``sensitivity(t) = #TP with score
>= t / #nodules``; the curve starts at (0, 0), and the sensitivity at a given rate is read from it by linear
interpolation along the curve (:func:`sensitivity_at`; beyond the last operating point the curve stays at its last
sensitivity). The competition performance metric
(CPM, the LUNA16 score) is the mean sensitivity over the rates 1/8, 1/4, 1/2, 1, 2, 4 and 8.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

FROC_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
NODULE_CLASS = 0


@dataclass(frozen=True)
class FROCCurve:
    """Operating points (one per distinct score threshold, plus the origin) and the sensitivities at the rates."""

    fps_per_scan: np.ndarray
    sensitivity: np.ndarray
    fp_rates: tuple[float, ...]
    sensitivity_at_rates: np.ndarray

    @classmethod
    def from_points(
        cls, fps_per_scan: np.ndarray, sensitivity: np.ndarray, fp_rates: Sequence[float] = FROC_FP_RATES
    ) -> FROCCurve:
        """The curve of operating points in threshold order (starting at the origin), its sensitivities at
        ``fp_rates`` read by :func:`sensitivity_at`."""
        fps, sensitivity = np.asarray(fps_per_scan, np.float64), np.asarray(sensitivity, np.float64)
        rates = tuple(float(r) for r in fp_rates)
        return cls(fps, sensitivity, rates, np.array([sensitivity_at(rate, fps, sensitivity) for rate in rates]))

    @property
    def cpm(self) -> float:
        """Competition performance metric: the mean sensitivity over ``fp_rates``."""
        return float(np.mean(self.sensitivity_at_rates))


def match_detections(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_thresholds: Sequence[float],
    max_detections: int = 100,
) -> list[dict]:
    """MONAI's ``matching_batch`` for one class; one entry per scan (boxes ``[n, 6]`` xyzxyz in one frame)."""
    return matching_batch(
        iou_fn=box_iou,
        iou_thresholds=iou_thresholds,
        pred_boxes=[np.asarray(b, dtype=np.float64).reshape(-1, 6) for b in pred_boxes],
        pred_classes=[np.full(len(s), NODULE_CLASS) for s in pred_scores],
        pred_scores=[np.asarray(s, dtype=np.float64).reshape(-1) for s in pred_scores],
        gt_boxes=[np.asarray(b, dtype=np.float64).reshape(-1, 6) for b in gt_boxes],
        gt_classes=[np.full(len(np.asarray(b).reshape(-1, 6)), NODULE_CLASS) for b in gt_boxes],
        max_detections=max_detections,
    )


def froc_from_matches(
    matches: Sequence[dict], num_scans: int, iou_index: int = 0, fp_rates: Sequence[float] = FROC_FP_RATES
) -> FROCCurve:
    """The FROC curve from ``matching_batch`` results (``iou_index``: which of its IoU thresholds to use).

    ``num_scans`` counts every evaluated scan, also those without nodules or detections (``matching_batch`` gives
    them no entry). Detections matched to ignored ground truth are left out, as COCOMetric does.
    """
    if num_scans < 1:
        raise ValueError(f"num_scans must be positive, got {num_scans}")
    scores, true_positive, num_nodules = [], [], 0
    for scan in matches:
        for result in scan.values():
            kept = np.asarray(result["dtIgnore"][iou_index]) == 0
            scores.append(result["dtScores"][kept])
            true_positive.append(result["dtMatches"][iou_index][kept] > 0)
            num_nodules += int(np.sum(np.asarray(result["gtIgnore"]) == 0))
    scores_all = np.concatenate(scores) if scores else np.zeros(0)
    tp_all = np.concatenate(true_positive) if true_positive else np.zeros(0, bool)
    rates = tuple(float(r) for r in fp_rates)
    if num_nodules == 0:
        warnings.warn("FROC: no ground-truth nodules in the evaluated scans; sensitivity is undefined (nan)")
        nan = np.full(len(rates), np.nan)
        return FROCCurve(np.zeros(1), np.full(1, np.nan), rates, nan)
    order = np.argsort(-scores_all, kind="stable")
    scores_sorted, tp_sorted = scores_all[order], tp_all[order]
    cumulative_tp = np.cumsum(tp_sorted)
    cumulative_fp = np.cumsum(~tp_sorted)
    # One operating point per distinct score: the last detection of each run of equal scores.
    is_last_of_threshold = np.zeros(len(scores_sorted), dtype=bool)
    if len(scores_sorted):
        is_last_of_threshold[:-1] = scores_sorted[1:] != scores_sorted[:-1]
        is_last_of_threshold[-1] = True
    fps = np.concatenate([[0.0], cumulative_fp[is_last_of_threshold] / num_scans])
    sensitivity = np.concatenate([[0.0], cumulative_tp[is_last_of_threshold] / num_nodules])
    return FROCCurve.from_points(fps, sensitivity, rates)


def sensitivity_at(rate: float, fps: np.ndarray, sensitivity: np.ndarray) -> float:
    """Sensitivity of a FROC curve (points in threshold order, ``fps`` non-decreasing) at ``rate`` FPs per scan.

    Linear interpolation along the curve: between the last point with ``fps <= rate`` and the next one. Where
    several points share the FP rate (thresholds that only add true positives), the last, i.e. the most sensitive,
    counts at that rate, and a rate between two FP values interpolates from the most sensitive point of the lower
    value to the least sensitive of the higher one. This is what the LUNA16 script's ``np.interp`` on the
    ``roc_curve`` points computes; spelled out here because ``np.interp`` documents no behaviour for repeated
    abscissae.
    """
    last = int(np.flatnonzero(fps <= rate)[-1])  # the curve starts at fps = 0, so there is one
    if last == len(fps) - 1 or fps[last] == rate:
        return float(sensitivity[last])
    fraction = (rate - fps[last]) / (fps[last + 1] - fps[last])
    return float(sensitivity[last] + fraction * (sensitivity[last + 1] - sensitivity[last]))


def evaluate_detections(
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    gt_boxes: Sequence[np.ndarray],
    iou_threshold: float = 0.1,
    max_detections: int = 100,
    fp_rates: Sequence[float] = FROC_FP_RATES,
) -> tuple[dict[str, float], FROCCurve]:
    """FROC sensitivities, CPM and MONAI's COCO AP/AR for per-scan detections and ground truth, and the FROC curve
    they were read from (for the FROC picture).

    Metric keys: ``froc_cpm``, ``sensitivity_fp{rate}`` for each rate, and COCOMetric's ``AP_IoU_{t}_MaxDet_{m}``,
    ``AR_...``, ``mAP_IoU_{t}_0.50_0.05_...``, ``mAR_...`` (the tutorial's validation metrics).
    """
    coco = COCOMetric(classes=["nodule"], iou_list=[iou_threshold], max_detection=[max_detections], verbose=False)
    matches = match_detections(pred_boxes, pred_scores, gt_boxes, coco.iou_thresholds, max_detections)
    iou_index = int(np.flatnonzero(np.isclose(coco.iou_thresholds, iou_threshold))[0])
    froc = froc_from_matches(matches, num_scans=len(gt_boxes), iou_index=iou_index, fp_rates=fp_rates)
    metrics = {"froc_cpm": froc.cpm}
    metrics.update({f"sensitivity_fp{rate:g}": float(s) for rate, s in zip(froc.fp_rates, froc.sensitivity_at_rates)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # COCOMetric divides by zero (and warns) when there are no detections
        coco_values = coco(matches)[0]
    metrics.update({k: float(v) for k, v in coco_values.items() if not k.startswith("nodule_")})
    return metrics, froc

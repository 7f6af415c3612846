"""The one implementation of the two frozen-feature probes of jointssl and their metrics.

- :func:`knn_probe` (and :func:`weighted_knn_predict`): weighted k-nearest-neighbour classification by cosine
  similarity, vote weight ``exp(similarity / temperature)`` (Wu et al. 2018; the monitor of InstDisc / DINO).
- :func:`linear_probe`: features standardised with the training split's statistics, then L2-regularised
  multinomial logistic regression fitted full-batch with L-BFGS (deterministic: float64 on CPU, zero
  initialisation, a fixed iteration budget).
- :func:`accuracy`, :func:`balanced_accuracy` (mean per-class recall) and :func:`binary_auroc`.

Used by ``jointssl evaluate`` (:mod:`jointssl.evaluation.protocol`) and by the online callback
(:class:`jointssl.callbacks.online_eval.OnlineKNNEvaluation`), so that the numbers logged during pretraining and
the numbers of an offline evaluation are computed by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

#: Defaults of the kNN probe (InstDisc / DINO).
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
#: Defaults of the linear probe.
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_MAX_ITER = 200


@dataclass(frozen=True)
class ProbeResult:
    """Predictions of a probe for Q queries over C classes.

    Attributes:
        predicted: [Q] class indices (long).
        scores: [Q, C] per-class scores, each row summing to 1: the kNN probe's share of the vote weight per
            class, the linear probe's softmax probabilities. ``scores[:, 1]`` is the score AUROC is computed from
            in a binary task.
    """

    predicted: Tensor
    scores: Tensor


# ----------------------------------------------------------------------------------------------------------------
# kNN


def weighted_knn_votes(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """Per-class vote weight [Q, C] of each query's k most cosine-similar bank rows.

    A neighbour with cosine similarity s votes for its class with weight ``exp(s / temperature)``. Every weight of
    a query is divided by the same constant ``exp(s_max / temperature)`` (``s_max``: its most similar neighbour),
    which changes neither the winner nor the shares and keeps small temperatures from overflowing.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if bank.shape[0] == 0:
        raise ValueError("kNN needs at least one labelled bank row")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    similarity, neighbours = (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    weights = ((similarity - similarity[:, :1]) / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank_labels.to(queries.device)[neighbours], weights)
    return votes


def weighted_knn_predict(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """Class of each query by the temperature-weighted vote of its k most cosine-similar bank rows
    (weight exp(similarity / temperature), as in Wu et al. 2018). Returns [Q] class indices."""
    return weighted_knn_votes(bank, bank_labels, queries, num_classes, k, temperature).argmax(dim=1)


def knn_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> ProbeResult:
    """Weighted kNN of the test rows against the training rows (see :func:`weighted_knn_votes`)."""
    votes = weighted_knn_votes(train_features, train_labels, test_features, num_classes, k, temperature)
    return ProbeResult(votes.argmax(dim=1), votes / votes.sum(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------------------------
# Linear probe


def standardise(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """``(x - mean) / std`` per feature with the mean and (population) standard deviation of ``train``, applied
    to ``train`` and to every tensor in ``others``. A feature that is constant on ``train`` is only centred."""
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in (train, *others))


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    max_iter: int = DEFAULT_MAX_ITER,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on ``features`` [n, D] (float64 recommended), full batch, by L-BFGS.

    Minimises, over W [C, D] and b [C],

        L(W, b) = (1/n) * sum_i -log softmax(W x_i + b)[y_i]  +  weight_decay * sum_{c,d} W[c, d]**2

    (mean cross-entropy plus a sum-of-squares penalty on the weights; the bias is not penalised), starting from
    W = 0, b = 0, with ``torch.optim.LBFGS(lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")`` in a single
    ``step``: at most ``max_iter`` iterations, fewer when the gradient or the change falls below L-BFGS's
    tolerances. The problem is convex and the run has no randomness, so the same inputs give the same weights.
    Returns (W, b).
    """
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"weight_decay must be >= 0 and max_iter >= 1, got {weight_decay} and {max_iter}")
    weight = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2, tolerance_grad=1e-10,
        tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    max_iter: int = DEFAULT_MAX_ITER,
) -> ProbeResult:
    """Linear probe: standardise both splits with the training split's per-feature mean and std
    (:func:`standardise`), fit :func:`fit_logistic_regression` on the training split, predict the test split.
    Computed in float64 on CPU whatever the inputs' device; the result is on CPU."""
    train, test = standardise(train_features.detach().double().cpu(), test_features.detach().double().cpu())
    weight, bias = fit_logistic_regression(train, train_labels.cpu().long(), num_classes, weight_decay, max_iter)
    probabilities = torch.softmax(test @ weight.T + bias, dim=1)
    return ProbeResult(probabilities.argmax(dim=1), probabilities)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def accuracy(predicted: Tensor, truth: Tensor) -> float:
    """Top-1 accuracy: the share of queries whose predicted class is the true one."""
    return float((predicted.cpu() == truth.cpu()).double().mean())


def balanced_accuracy(predicted: Tensor, truth: Tensor) -> float:
    """Mean per-class recall over the classes present in ``truth`` (a class without test items has no recall);
    robust to class imbalance: always predicting the majority class scores 1 / number of classes."""
    predicted, truth = predicted.cpu(), truth.cpu()
    recalls = [(predicted[truth == c] == c).double().mean() for c in truth.unique()]
    return float(torch.stack(recalls).mean())


def binary_auroc(positive_scores: Tensor, truth: Tensor) -> float | None:
    """Area under the ROC curve of the scores of class 1 (torchmetrics' ``binary_auroc``); None when ``truth``
    does not hold both classes (the AUROC is undefined)."""
    from torchmetrics.functional.classification import binary_auroc as torchmetrics_binary_auroc

    truth = truth.cpu().long()
    if truth.unique().numel() < 2:
        return None
    return float(torchmetrics_binary_auroc(positive_scores.detach().cpu().double(), truth))

"""How much of a masked slice embedding can anything predict beyond interpolating its visible neighbours?

L_mask is judged against two trivial predictors (jointssl.diagnostics): the mean of the visible slices and linear
interpolation between the nearest visible neighbours (``train/mask_r2_vs_neighbours``). When the model's R^2
against interpolation stays near 0, either f_inter fails to learn or there is little left to learn. This script
tells the two apart on held-out volumes, in the units L_mask uses (per-volume standardised slice embeddings of a
pretraining checkpoint's f_intra, masked with the checkpoint's own mask_ratio and mask_span on windows of its
num_slices consecutive slices):

- ``model``: the checkpoint's own L_mask prediction (interpolation + mask decoder of f_inter's tokens), eval mode;
- ``shrunk interpolation``: a * interpolation, ``a`` fitted by least squares on the training volumes;
- ``learned interpolation``: least squares over the training volumes, shared by all embedding dimensions, of the
  residual on [interpolation, 2 nearest visible slices on each side, the same times the relative position] (a
  fitted higher-order interpolation: cubic interpolation is one point of this family);
- ``ridge, all dimensions``: the same 9 context vectors, but every embedding dimension of the residual predicted
  from every dimension of them (a [9 D] -> [D] ridge regression; the penalty chosen on a quarter of the training
  windows held out from the fit, then refitted on all): what any linear map of the nearby visible slices gains;
- ``MLP, nearby slices`` and ``MLP, whole window``: nonlinear versions, a one-hidden-layer MLP (128 GELU units,
  input dropout 0.2, AdamW lr 3e-5, weight decay 0.1; the best of 4 settings on the held-out quarter of the
  training windows, docs/results.md; early stopping on that quarter, step 0 = plain interpolation included) from
  the same 9 context vectors,
  or from the whole window (every visible slice in place, zeros at the masked ones, the mask and the position of
  the slice to predict), to the residual: whether anything learnable, not only linear maps, is left.

Each is reported as R^2 against linear interpolation on the held-out windows (> 0: better than interpolation).

    .venv/bin/python benchmarks/mask_ceiling.py CHECKPOINT --train-volumes A.csv --test-volumes B.csv [--json OUT]

CSV manifests with a ``path`` column (as written by representation_quality.py prepare).
"""

from __future__ import annotations

import argparse
import csv
import sys

import torch
from torch import Tensor

from jointssl.checkpointing import write_json
from jointssl.data.volume_io import VolumeRecord
from jointssl.evaluation.inputs import preprocess_volume
from jointssl.losses.masked import interpolate_masked_slices, random_slice_mask, visible_slices
from jointssl.models.aggregator import standardise_slices
from jointssl.pretrain import JointSSL


def read_paths(manifest: str) -> list[str]:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        return [row["path"] for row in csv.DictReader(handle)]


@torch.no_grad()
def slice_windows(model: JointSSL, paths: list[str], num_slices: int, size: int, step: int) -> Tensor:
    """f_intra embeddings of windows of ``num_slices`` consecutive slices, every ``step`` slices: [W, N, D]."""
    windows = []
    for path in paths:
        slices = preprocess_volume(VolumeRecord(path=path, source="ceiling"), size)
        z = torch.cat([model.encoder(chunk) for chunk in slices.split(64)])
        windows.extend(z[start:start + num_slices] for start in range(0, len(z) - num_slices + 1, step))
    return torch.stack(windows)


@torch.no_grad()
def masked_views(model: JointSSL, z: Tensor, repeats: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(mask, target, interpolation, model prediction) for ``repeats`` mask draws (seeds 0..repeats-1)."""
    hp = model.hparams
    views = []
    for seed in range(repeats):
        mask = random_slice_mask(None, z.shape[1], z.shape[0], ratio=hp.mask_ratio, span=hp.mask_span,
                                 generator=torch.Generator().manual_seed(seed))
        target = standardise_slices(z, visible_slices(mask, None))
        interpolation = interpolate_masked_slices(target, mask)
        predicted = interpolation + model.mask_decoder(model.aggregator(z, None, mask))
        views.append((mask, target, interpolation, predicted))
    return views


def context_features(target: Tensor, mask: Tensor, interpolation: Tensor) -> tuple[Tensor, Tensor]:
    """Per masked slice and dimension: features [M * D, 9] and the interpolation's residual [M * D]."""
    features, residuals = [], []
    for b in range(target.shape[0]):
        visible = (~mask[b]).nonzero().flatten().tolist()
        for i in mask[b].nonzero().flatten().tolist():
            before = [j for j in visible if j < i][-2:]
            after = [j for j in visible if j > i][:2]
            before = [before[0]] * (2 - len(before)) + before if before else [after[0]] * 2
            after = after + [after[-1]] * (2 - len(after)) if after else [before[-1]] * 2
            weight = (i - before[-1]) / max(1, after[0] - before[-1])
            context = [target[b, j] for j in before + after]
            columns = [interpolation[b, i], *context, *(weight * c for c in context)]
            features.append(torch.stack(columns, dim=1))
            residuals.append(target[b, i] - interpolation[b, i])
    return torch.cat(features), torch.cat(residuals)


def ridge_residual_predictor(train: list, penalties: tuple[float, ...] = (1e-1, 1e0, 1e1, 1e2, 1e3, 1e4)):
    """Fit [9 D] context -> [D] residual by ridge regression on the training views; returns predict(views)."""

    def design(views: list) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for m, t, i, _ in views:
            x, y = context_features(t, m, i)
            dim = t.shape[-1]
            xs.append(x.view(-1, dim, x.shape[-1]).transpose(1, 2).reshape(-1, x.shape[-1] * dim))
            ys.append(y.view(-1, dim))
        return torch.cat(xs).double(), torch.cat(ys).double()

    def fit(x: Tensor, y: Tensor, penalty: float) -> tuple[Tensor, Tensor, Tensor]:
        mean_x, mean_y = x.mean(0), y.mean(0)
        xc = x - mean_x
        gram = xc.T @ xc + penalty * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype)
        return torch.linalg.solve(gram, xc.T @ (y - mean_y)), mean_x, mean_y

    # Penalty chosen on the last quarter of the training windows (whole windows: the same mask draws' rows).
    windows = train[0][0].shape[0]
    cut = windows - max(1, windows // 4)
    fit_views = [(m[:cut], t[:cut], i[:cut], p[:cut]) for m, t, i, p in train]
    check_views = [(m[cut:], t[cut:], i[cut:], p[cut:]) for m, t, i, p in train]
    x_fit, y_fit = design(fit_views)
    x_check, y_check = design(check_views)
    errors = {}
    for penalty in penalties:
        w, mx, my = fit(x_fit, y_fit, penalty)
        errors[penalty] = float((((x_check - mx) @ w + my - y_check) ** 2).mean())
    best = min(errors, key=errors.get)
    w, mx, my = fit(*design(train), best)

    def predict(views: list) -> list[Tensor]:
        out = []
        for m, t, i, _ in views:
            x, _ = design([(m, t, i, None)])
            prediction = i.clone()
            prediction[m] = i[m] + ((x - mx) @ w + my).float()
            out.append(prediction)
        return out

    return predict, best


def window_features(target: Tensor, mask: Tensor, interpolation: Tensor) -> tuple[Tensor, Tensor]:
    """Per masked slice: the whole window [N D + 2 N] (visible slices in place, zeros at the masked ones, the mask,
    a one-hot of the slice's position) and the interpolation's residual [D]."""
    features, residuals = [], []
    num_slices = target.shape[1]
    for b in range(target.shape[0]):
        visible_window = torch.where(mask[b].unsqueeze(-1), torch.zeros_like(target[b]), target[b]).flatten()
        for i in mask[b].nonzero().flatten().tolist():
            position = torch.zeros(num_slices)
            position[i] = 1.0
            features.append(torch.cat([visible_window, mask[b].float(), position]))
            residuals.append(target[b, i] - interpolation[b, i])
    return torch.stack(features), torch.stack(residuals)


def nearby_features(target: Tensor, mask: Tensor, interpolation: Tensor) -> tuple[Tensor, Tensor]:
    """Per masked slice: the 9 context vectors of ``context_features`` flattened [9 D], and the residual [D]."""
    x, y = context_features(target, mask, interpolation)
    dim = target.shape[-1]
    return x.view(-1, dim, x.shape[-1]).transpose(1, 2).reshape(-1, x.shape[-1] * dim), y.view(-1, dim)


def mlp_residual_predictor(train: list, features, hidden: int = 128, steps: int = 3000, seed: int = 0):
    """A one-hidden-layer MLP from ``features`` (a function of one view's target, mask, interpolation) to the
    interpolation's residual, trained with AdamW on the first three quarters of the training windows and stopped
    where the last quarter's error is lowest; returns predict(views) and the chosen step."""
    windows = train[0][0].shape[0]
    cut = windows - max(1, windows // 4)

    def design(views: list, part: slice) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*(features(t[part], m[part], i[part]) for m, t, i, _ in views))
        return torch.cat(xs), torch.cat(ys)

    x_fit, y_fit = design(train, slice(0, cut))
    x_check, y_check = design(train, slice(cut, None))
    mean, scale = x_fit.mean(0), x_fit.std(0).clamp(min=1e-6)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x_fit.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, y_fit.shape[1]))
    torch.nn.init.zeros_(net[3].weight)  # step 0 is plain interpolation (residual 0), a candidate like any other
    torch.nn.init.zeros_(net[3].bias)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-5, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    best_error, best_step = float((y_check**2).mean()), 0
    best_state = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(1, steps + 1):
        net.train()
        rows = torch.randint(0, len(x_fit), (256,), generator=generator)
        loss = ((net((x_fit[rows] - mean) / scale) - y_fit[rows]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            net.eval()
            with torch.no_grad():
                error = float(((net((x_check - mean) / scale) - y_check) ** 2).mean())
            if error < best_error:
                best_error, best_step = error, step
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()

    @torch.no_grad()
    def predict(views: list) -> list[Tensor]:
        out = []
        for m, t, i, _ in views:
            x, _ = features(t, m, i)
            prediction = i.clone()
            prediction[m] = i[m] + net((x - mean) / scale)
            out.append(prediction)
        return out

    return predict, best_step


def r2_against_interpolation(predictions: list[Tensor], views: list) -> float:
    error = sum(((p - t) ** 2)[m].sum() for p, (m, t, _, _) in zip(predictions, views))
    baseline = sum(((i - t) ** 2)[m].sum() for m, t, i, _ in views)
    return float(1 - error / baseline)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--train-volumes", required=True, help="CSV manifest: volumes the fits are made on")
    parser.add_argument("--test-volumes", required=True, help="CSV manifest: held-out volumes they are scored on")
    parser.add_argument("--num-slices", type=int, default=16, help="window length (the run's data.num_slices)")
    parser.add_argument("--volume-size", type=int, default=64)
    parser.add_argument("--window-step", type=int, default=4, help="slices between window starts")
    parser.add_argument("--repeats", type=int, default=4, help="mask draws per window")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--random-init", action="store_true",
                        help="the checkpoint's architecture with random weights (seed 0): the ceiling before training")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = JointSSL.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    if args.random_init:
        torch.manual_seed(0)
        model = JointSSL(**{k: v for k, v in model.hparams.items() if k != "init_from"}).eval()
    num_slices = args.num_slices
    train = masked_views(model, slice_windows(model, read_paths(args.train_volumes), num_slices, args.volume_size,
                                              args.window_step), args.repeats)
    test = masked_views(model, slice_windows(model, read_paths(args.test_volumes), num_slices, args.volume_size,
                                             args.window_step), args.repeats)

    # Shrinkage towards the visible mean (0 in standardised units), fitted on the training windows.
    numerator = sum((i * t)[m].sum() for m, t, i, _ in train)
    denominator = sum((i * i)[m].sum() for m, t, i, _ in train)
    shrink = float(numerator / denominator)
    x_train, y_train = map(torch.cat, zip(*(context_features(t, m, i) for m, t, i, _ in train)))
    weights = torch.linalg.lstsq(x_train.double(), y_train.double().unsqueeze(1)).solution.float()

    learned = []
    for m, t, i, _ in test:
        x, _ = context_features(t, m, i)
        prediction = i.clone()
        prediction[m] = i[m] + (x @ weights).view(-1, t.shape[-1])
        learned.append(prediction)
    ridge, penalty = ridge_residual_predictor(train)
    mlp_nearby, nearby_step = mlp_residual_predictor(train, nearby_features)
    mlp_window, window_step = mlp_residual_predictor(train, window_features)
    report = {
        "checkpoint": args.checkpoint,
        "random_init": args.random_init,
        "num_slices": num_slices,
        "mask_ratio": float(model.hparams.mask_ratio),
        "mask_span": int(model.hparams.mask_span),
        "train_windows": int(train[0][0].shape[0]),
        "test_windows": int(test[0][0].shape[0]),
        "r2_vs_interpolation": {
            "visible mean": r2_against_interpolation([torch.zeros_like(t) for _, t, _, _ in test], test),
            "model": r2_against_interpolation([p for *_, p in test], test),
            f"shrunk interpolation (a={shrink:.3f})": r2_against_interpolation([shrink * i for _, _, i, _ in test],
                                                                                test),
            "learned interpolation": r2_against_interpolation(learned, test),
            f"ridge, all dimensions (penalty {penalty:g})": r2_against_interpolation(ridge(test), test),
            f"MLP, nearby slices (step {nearby_step})": r2_against_interpolation(mlp_nearby(test), test),
            f"MLP, whole window (step {window_step})": r2_against_interpolation(mlp_window(test), test),
        },
    }
    print(f"{args.checkpoint}: {report['test_windows']} held-out windows of {num_slices} slices "
          f"(fits on {report['train_windows']}); R^2 against linear interpolation")
    for name, value in report["r2_vs_interpolation"].items():
        print(f"  {name:40s} {value:+.3f}")
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

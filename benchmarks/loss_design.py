"""The experiments behind L_mask's and L_inter's design (docs/results.md, "What each loss learns"): f_inter and its
heads trained alone on FIXED slice embeddings of augmented demo volumes, so that one variant takes seconds.

    # 1. slice embeddings [volumes, views, slices, d] of 3 augmented view pairs per demo volume, from a checkpoint
    #    (or the same architecture at random init)
    python benchmarks/loss_design.py embed runs/demo/checkpoints/last.ckpt runs/loss_design/views.pt
    python benchmarks/loss_design.py embed runs/demo/checkpoints/last.ckpt runs/loss_design/views_random.pt --random-init
    # 2. the variants (held-out R^2 of L_mask against its two baselines; L_inter over ln K, view agreement)
    python benchmarks/loss_design.py mask runs/loss_design/views.pt
    python benchmarks/loss_design.py inter runs/loss_design/views.pt

Volumes 0..23 of a fixed permutation train, the other 8 are held out (mask). One torch thread. The demo data must
exist (`make demo` generates it into demo_data/).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from jointssl.data import JointDataModule  # noqa: E402
from jointssl.data.synthetic import SyntheticData  # noqa: E402
from jointssl.diagnostics import r2_against, visible_mean_baseline  # noqa: E402
from jointssl.losses import interpolate_masked_slices, masked_embedding_loss, random_slice_mask  # noqa: E402
from jointssl.models import MaskDecoder, SliceAggregator  # noqa: E402
from jointssl.models.aggregator import standardise_slices  # noqa: E402
from jointssl.objectives import SwAVObjective  # noqa: E402
from jointssl.optim import lars  # noqa: E402
from jointssl.pretrain import JointSSL  # noqa: E402


def load_model(checkpoint: str, random_init: bool) -> JointSSL:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    model = JointSSL(**hparams)
    if not random_init:
        model.load_state_dict(state["state_dict"], strict=False)
    return model.eval()


@torch.no_grad()
def embed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = load_model(args.checkpoint, args.random_init)
    config = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())["data"]["init_args"]
    synthetic = SyntheticData(**{**config.pop("synthetic"), "root": str(REPO_ROOT / "demo_data")})
    data = JointDataModule(synthetic=synthetic, **{**config, "num_workers": 0, "persistent_workers": False})
    data.prepare_data()
    data.setup("fit")
    dataset = data.volume_dataset
    volumes = []
    for v in range(len(dataset)):
        views = []
        for pair in range(3):
            dataset.views.reseed(1000 * v + pair)
            item = dataset[v]
            real = ~item["padding_mask"]
            for w in range(2):
                z = torch.zeros(item["views"].shape[1], model.hparams.d_model)
                z[real] = model.encoder(item["views"][w][real])
                views.append(z)
        volumes.append(torch.stack(views))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.stack(volumes), out)
    print(f"{out}: {tuple(volumes[0].shape)} x {len(volumes)} volumes")


def _leaky_standardise(z: torch.Tensor) -> torch.Tensor:
    """Per-volume standardisation over ALL slices, masked ones included: the variant that looked best (R^2 0.78 /
    0.46) until we saw it leaks (the visible slices' mean then encodes the masked ones). Kept to show why not."""
    deviation = z - z.mean(1, keepdim=True)
    return deviation / deviation.pow(2).mean((1, 2), keepdim=True).sqrt().clamp(min=1e-6)


def mask_variant(z_all: torch.Tensor, *, target: str, input: str, span: int, ratio: float, downsample: int,
                 residual: bool, optimizer: str, lr: float, steps: int, seed: int = 0) -> tuple[float, float]:
    """Train f_inter + decoder on L_mask; mean held-out R^2 against (visible mean, neighbour interpolation)."""
    volumes, views, num_slices, d_model = z_all.shape
    order = torch.randperm(volumes, generator=torch.Generator().manual_seed(0))
    train, test = order[:24], order[24:]
    torch.manual_seed(seed)
    aggregator = SliceAggregator(d_model=d_model, num_layers=2, num_heads=4, ffn_dim=192, dropout=0.0,
                                 downsample=downsample, input_norm="volume" if input == "volume" else "none")
    decoder = MaskDecoder(d_model)
    parameters = list(aggregator.parameters()) + list(decoder.parameters())
    if optimizer == "lars":
        opt = lars(parameters, lr=lr, momentum=0.9, weight_decay=1e-6, trust_coefficient=1e-3)
    else:
        opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)

    def predict(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input == "leaky":
            tokens = aggregator(aggregator.apply_mask(_leaky_standardise(z), mask))
        else:
            tokens = aggregator(z, None, mask) if input == "volume" else aggregator(aggregator.apply_mask(z, mask))
        goal = {"raw": z, "visible": standardise_slices(z, ~mask), "leaky": _leaky_standardise(z)}[target]
        predicted = decoder(tokens)
        if residual:
            predicted = predicted + interpolate_masked_slices(goal, mask)
        return predicted, goal

    for _ in range(steps):
        pick = train[torch.randint(0, len(train), (8,), generator=generator)]
        z = z_all[pick, torch.randint(0, views, (8,), generator=generator)]
        mask = random_slice_mask(None, num_slices, 8, ratio=ratio, span=span, generator=generator)
        predicted, goal = predict(z, mask)
        loss = masked_embedding_loss(predicted, goal, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    aggregator.eval()
    decoder.eval()
    vs_mean, vs_neighbours = [], []
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for view in range(views):
            z = z_all[test, view]
            mask = random_slice_mask(None, num_slices, len(test), ratio=ratio, span=span, generator=generator)
            predicted, goal = predict(z, mask)
            vs_mean.append(r2_against(predicted, goal, visible_mean_baseline(goal, mask), mask))
            vs_neighbours.append(r2_against(predicted, goal, interpolate_masked_slices(goal, mask), mask))
    return float(torch.stack(vs_mean).mean()), float(torch.stack(vs_neighbours).mean())


MASK_VARIANTS = [
    # The paper's formulation: 15% independent slices, a mask token decoded to the raw embedding.
    dict(target="raw", input="raw", span=1, ratio=0.15, downsample=4, residual=False),
    dict(target="visible", input="raw", span=1, ratio=0.15, downsample=4, residual=False),
    dict(target="visible", input="raw", span=4, ratio=0.3, downsample=4, residual=False),
    dict(target="leaky", input="leaky", span=4, ratio=0.3, downsample=4, residual=False),
    dict(target="visible", input="volume", span=4, ratio=0.3, downsample=4, residual=False),
    dict(target="visible", input="volume", span=4, ratio=0.3, downsample=1, residual=False),
    # What JointSSL does: volume tokens, spans, standardised targets, prediction = interpolation + correction.
    dict(target="visible", input="volume", span=4, ratio=0.3, downsample=4, residual=True),
]


def mask(args: argparse.Namespace) -> None:
    z_all = torch.load(args.views)
    for variant in MASK_VARIANTS:
        for optimizer, lr, steps in (("lars", 0.6, 180), ("adamw", 1e-3, 600)):
            started = time.perf_counter()
            r2 = mask_variant(z_all, **variant, optimizer=optimizer, lr=lr, steps=steps)
            print(f"{variant} {optimizer} lr {lr} {steps} steps: R^2 vs visible mean {r2[0]:.3f}, vs neighbours "
                  f"{r2[1]:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)


def inter_variant(z_all: torch.Tensor, *, input_norm: str, hidden: int, prototypes: int = 16, queue: int = 64,
                  batch: int = 4, steps: int = 300, seed: int = 0) -> tuple[float, float, int]:
    """Train f_inter + the 3D SwAV head on two views per volume; (last-50-step loss / ln K, share of volumes whose
    views agree on the prototype, prototypes in use) in eval mode over all volumes."""
    volumes, views, _, d_model = z_all.shape
    torch.manual_seed(seed)
    aggregator = SliceAggregator(d_model=d_model, num_layers=2, num_heads=4, ffn_dim=192, dropout=0.1,
                                 input_norm=input_norm)
    task = SwAVObjective(in_dim=d_model, hidden_dim=hidden, out_dim=64, num_prototypes=[prototypes],
                         temperature=0.1, sinkhorn_epsilon=0.05, sinkhorn_iterations=3, queue_length=queue)
    parameters = list(aggregator.parameters()) + list(task.parameters())
    opt = lars(parameters, lr=0.075, momentum=0.9, weight_decay=1e-6, trust_coefficient=1e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        pick = torch.randperm(volumes, generator=generator)[:batch]
        pair = torch.randperm(views, generator=generator)[:2]
        task.before_step()
        embeddings = [task.project(aggregator.pool(aggregator(z_all[pick, pair[i]]))) for i in range(2)]
        out = task.multicrop_loss(embeddings, pick, use_queue=step >= 18)
        opt.zero_grad()
        out.loss.backward()
        if step < 5:
            task.drop_prototype_grads()
        opt.step()
        losses.append(out.loss.item())
    aggregator.eval()
    task.eval()
    with torch.no_grad():
        weight = task.prototypes.heads[0].weight
        assigned = [(task.project(aggregator.pool(aggregator(z_all[:, v]))) @ weight.T).argmax(1) for v in range(views)]
        agree = sum((assigned[0] == a).float().mean() for a in assigned[1:]) / (views - 1)
    return sum(losses[-50:]) / 50 / math.log(prototypes), float(agree), len(set(assigned[0].tolist()))


def inter(args: argparse.Namespace) -> None:
    z_all = torch.load(args.views)
    for variant in (dict(input_norm="none", hidden=256), dict(input_norm="volume", hidden=256),
                    dict(input_norm="none", hidden=0), dict(input_norm="volume", hidden=256, steps=600)):
        started = time.perf_counter()
        loss, agree, used = inter_variant(z_all, **variant)
        print(f"{variant}: L_inter / ln K {loss:.3f}, views agree {agree:.2f}, prototypes used {used} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("embed")
    p.add_argument("checkpoint")
    p.add_argument("output")
    p.add_argument("--random-init", action="store_true")
    p.set_defaults(run=embed)
    for name, run in (("mask", mask), ("inter", inter)):
        p = commands.add_parser(name)
        p.add_argument("views")
        p.set_defaults(run=run)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

"""Cost of the SSL machinery on top of the backbone, per training step.

Measures, side by side in one run and on the same input batch:

- ``backbone``: the plain timm model (global-pooled features, no head) forward + backward — the floor;
- ``swav``: SliceEncoder (multi-scale pooling + Linear) -> ProjectionHead -> prototype normalisation ->
  SwAVLoss (Sinkhorn-Knopp codes, swapped prediction), forward + backward;
- ``deepcluster_v2``: the same encoder and projection -> 3 frozen prototype heads -> DeepClusterV2Loss against
  pseudo-labels from the memory bank, forward + backward + memory-bank update. (k-means runs once per epoch,
  not per step, so it is not part of the step.)

Variants run round-robin (one step of each in turn) so that a shared, noisy CPU slows them alike; the median
and the minimum over the measured steps (after warm-up steps) are reported, in wall time and in process CPU
time, with the overhead of each SSL variant relative to the backbone (target: <= 15%). ``--optimizer`` adds a LARS step to every variant.

    .venv/bin/python benchmarks/bench_step.py                          # resnet50, 2 x 16 crops of 128 px
    .venv/bin/python benchmarks/bench_step.py --batch-size 4 --image-size 64 --steps 3 --backbone resnet18
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import timm
import torch
from torch import Tensor, nn

from jointssl.losses import DeepClusterMemory, DeepClusterV2Loss, SwAVLoss
from jointssl.models import ProjectionHead, Prototypes, SliceEncoder
from jointssl.optim import lars

# A step: takes the [crops * B, 1, H, W] batch and the [B] sample indices, runs forward + backward (+ updates).
StepFn = Callable[[Tensor, Tensor], None]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="samples per step (each gives --crops crops)"
    )
    parser.add_argument("--crops", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps per variant first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=640)
    parser.add_argument("--num-prototypes", type=int, default=3000)
    parser.add_argument("--dc-heads", type=int, default=3, help="DeepCluster-v2 prototype heads")
    parser.add_argument("--optimizer", action="store_true", help="include a LARS step in every variant")
    return parser.parse_args()


def make_backbone_step(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, StepFn]:
    model = timm.create_model(args.backbone, in_chans=1, num_classes=0).to(device).train()

    def step(images: Tensor, indices: Tensor) -> None:
        features = model(images)
        features.float().square().mean().backward()

    return model, step


def make_swav_step(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, StepFn]:
    encoder = SliceEncoder(args.backbone, d_model=args.d_model)
    projection = ProjectionHead(args.d_model)
    prototypes = Prototypes(projection.out_dim, args.num_prototypes)
    loss_fn = SwAVLoss(crops_for_assign=(0, 1), embedding_dim=projection.out_dim)
    model = nn.ModuleDict(
        {"encoder": encoder, "projection": projection, "prototypes": prototypes, "loss": loss_fn}
    ).to(device)
    model.train()

    def step(images: Tensor, indices: Tensor) -> None:
        prototypes.normalize_()
        embeddings = projection(encoder(images)).chunk(args.crops)
        output = loss_fn(list(embeddings), prototypes.heads[0].weight, use_queue=False)
        output.loss.backward()

    return model, step


def make_deepcluster_step(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, StepFn]:
    encoder = SliceEncoder(args.backbone, d_model=args.d_model)
    projection = ProjectionHead(args.d_model)
    sizes = [args.num_prototypes] * args.dc_heads
    prototypes = Prototypes(projection.out_dim, sizes)
    prototypes.freeze(True)  # DeepCluster-v2 prototypes are k-means centroids, never trained
    dataset_size = 100 * args.batch_size
    memory = DeepClusterMemory(
        bank_size=dataset_size,
        embedding_dim=projection.out_dim,
        num_crops=args.crops,
        dataset_size=dataset_size,
        num_prototypes=sizes,
    )
    loss_fn = DeepClusterV2Loss(temperature=0.1)
    model = nn.ModuleDict(
        {"encoder": encoder, "projection": projection, "prototypes": prototypes, "memory": memory}
    ).to(device)
    model.train()
    # Pseudo-labels as k-means would leave them at epoch start.
    memory.labels.copy_(torch.randint(args.num_prototypes, memory.labels.shape, device=device))

    def step(images: Tensor, indices: Tensor) -> None:
        embeddings = projection(encoder(images))
        scores = [head_scores.chunk(args.crops) for head_scores in prototypes(embeddings)]
        loss = loss_fn(scores, memory.targets(indices))
        loss.backward()
        memory.update(indices, [crop.detach() for crop in embeddings.chunk(args.crops)])

    return model, step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    if args.crops < 2:
        raise SystemExit("--crops must be >= 2 (swapped prediction needs two crops)")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    variants: dict[str, tuple[nn.Module, StepFn, torch.optim.Optimizer | None]] = {}
    for name, factory in [
        ("backbone", make_backbone_step),
        ("swav", make_swav_step),
        ("deepcluster_v2", make_deepcluster_step),
    ]:
        model, step = factory(args, device)
        optimizer = (
            lars(model.parameters(), lr=0.1) if args.optimizer else None
        )
        variants[name] = (model, step, optimizer)

    images = torch.randn(args.batch_size * args.crops, 1, args.image_size, args.image_size, device=device)
    indices = torch.arange(args.batch_size, device=device)
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    measured = "with LARS step" if args.optimizer else "forward + backward only"
    print(
        f"{args.backbone}, {args.crops} crops x {args.batch_size} samples of {args.image_size} px, "
        f"device {device}{threads}, {measured}"
    )

    # Wall time, and process CPU time (all threads): on a shared machine other processes stretch wall time while
    # this process waits for a core, but barely change the CPU time it spends.
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for iteration in range(args.warmup_steps + args.steps):
        for name, (model, step, optimizer) in variants.items():
            model.zero_grad(set_to_none=True)  # outside the timing, as grads would otherwise accumulate
            synchronize(device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            step(images, indices)
            if optimizer is not None:
                optimizer.step()
            synchronize(device)
            if iteration >= args.warmup_steps:
                wall[name].append(time.perf_counter() - wall_start)
                cpu[name].append(time.process_time() - cpu_start)

    for clock, times in [("wall", wall), ("process CPU", cpu)]:
        print_table(clock, times)
    print("target: SSL machinery adds <= 15% over the backbone step")


def print_table(clock: str, times: dict[str, list[float]]) -> None:
    """Median and minimum seconds per step and the overhead over ``backbone`` by both. Noise only ever adds
    time, so on a shared machine the minimum is often the more robust estimate."""
    base_median, base_min = statistics.median(times["backbone"]), min(times["backbone"])
    print(f"{clock} time per step:")
    print(
        f"  {'variant':<16}{'median s':>10}{'min s':>9}{'max s':>9}{'overhead(median)':>18}{'overhead(min)':>15}"
    )
    for name, step_times in times.items():
        median, fastest = statistics.median(step_times), min(step_times)
        if name == "backbone":
            by_median = by_min = ""
        else:
            by_median = f"{100 * (median / base_median - 1):+.1f}%"
            by_min = f"{100 * (fastest / base_min - 1):+.1f}%"
        print(f"  {name:<16}{median:>10.3f}{fastest:>9.3f}{max(step_times):>9.3f}{by_median:>18}{by_min:>15}")


if __name__ == "__main__":
    main()

"""How the cost grows: the joint step and the slice aggregator against the number of slices per view, and the CPU
cost of the data streams (with the loader cores one GPU would need).

Parts (``--part``, default ``slices``; ``all`` runs both):

``slices``
    For every N in ``--slices`` (default 16 32 64 128 256 slices per volume view) four variants:

    * ``joint``: one joint step (``JointSSL.compute_losses`` forward + backward, as ``bench_joint_step.py``), no
      chunking; ``joint ckpt``: the same with ``slice_chunk_size=--chunk-size`` and ``checkpoint_slices``;
    * ``deformable``: the aggregator alone (``SliceAggregator``, JointSSL's default f_inter: d_model, 4 layers,
      8 heads, FFN 720, ``input_norm="volume"``) forward + backward over ``2 x --volumes`` sequences of N random
      tokens (loss: mean of the squared tokens, gradient also to the input tokens, as in the step);
    * ``unbounded``: the same module with ``max_points=None``, ceil(N / 4) keys per query (the aggregator before
      ``deformable_max_points``; the default bound, 64, only differs beyond 256 slices);
    * ``sdpa``: the same module (same weights, norms, FFN, input normalisation) with each layer's deformable
      attention replaced by full multi-head attention through ``torch.nn.functional.scaled_dot_product_attention``
      on the same query/key/value/output projections: every query attends to all N tokens.

    ``--agg-slices`` adds longer sequences for the two aggregator variants only (default 512 1024), where the
    step itself is too slow for this machine. **Memory**: every (variant, N) in a fresh interpreter, the
    resident-set high-water mark of one step (``bench_joint_step.py``'s method and helpers: VmHWM reset through
    /proc/self/clear_refs, glibc mmap threshold 64 KiB; *net* = peak minus the resident set once the model and the
    inputs are built). **Time**: one process, every (variant, N) interleaved step by step with the order rotated
    every round; median over ``--steps`` measured rounds after ``--warmup-steps``; wall and process CPU time.
    Fits: the exponent b of time = a * N^b (least squares in log-log over all N, and from the last two N), and a
    linear fit time = c + d * N. Ratios: sdpa / deformable and ckpt / plain at every N.

``data``
    Per-sample CPU cost of the two loader streams, one sample at a time in this process (``--threads`` torch
    threads; a DataLoader worker runs one): the 2D stream (``ImageDataset`` + ``MultiCropTransform`` at the crop
    sizes of configs/pretrain/joint_swav.yaml: 2 x 224 px + 6 x 96 px) on generated grayscale PNGs of
    ``--image-size`` px, split into decoding and augmentation; and the 3D stream (``VolumeDataset`` +
    ``VolumeViews`` at num_slices 64 / volume_size 128 from a warm disk cache, ``bench_volume_loader.py``'s
    generated CT-like volumes), split into the cached load and the views. Then the loader cores to feed one GPU
    at an *assumed* joint-step throughput (``--gpu-img-s``, see the README section "Data loading cost").

Results go to ``--output`` (JSON) and, with ``--plot``, PNGs under benchmarks/plots/.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scaling.py --part all --plot      # ~20 min on 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scaling.py --quick                  # seconds, tiny shapes

The DDP overhead (2 processes over 1 on the same per-rank batch) is measured by ``bench_slurm.py --skip-slurm``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import bench_joint_step as bjs  # noqa: E402
from jointssl.checkpointing import write_json  # noqa: E402
from jointssl.models.aggregator import SliceAggregator  # noqa: E402
from jointssl.models.volume_encoder import AggregatorConfig  # noqa: E402

VARIANTS = ("joint", "joint ckpt", "deformable", "unbounded", "sdpa")
AGGREGATOR_VARIANTS = ("deformable", "unbounded", "sdpa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("slices", "data", "all"), default="slices")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: checks that it runs")
    shapes = parser.add_argument_group("slices: model and batch")
    shapes.add_argument("--backbone", default="resnet50")
    shapes.add_argument("--d-model", type=int, default=640)
    shapes.add_argument("--slices", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    shapes.add_argument("--agg-slices", type=int, nargs="*", default=[512, 1024],
                        help="extra N for the aggregator variants only")
    shapes.add_argument("--size", type=int, default=32, help="in-plane size of the slices (CPU-sized)")
    shapes.add_argument("--volumes", type=int, default=2, help="volumes per step (two views each)")
    shapes.add_argument("--chunk-size", type=int, default=32, help="slice_chunk_size of the checkpointed variant")
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, default=3, help="measured rounds (time)")
    run.add_argument("--warmup-steps", type=int, default=1)
    run.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    run.add_argument("--skip-memory", action="store_true")
    run.add_argument("--memory-jobs", type=int, default=1, help="memory worker processes at a time")
    run.add_argument("--skip-time", action="store_true")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--output", default="runs/bench_scaling/results.json")
    run.add_argument("--plot", action="store_true", help="write benchmarks/plots/scaling_*.png / data_*.png")
    run.add_argument("--plot-dir", default=str(HERE / "plots"))
    data = parser.add_argument_group("data")
    data.add_argument("--samples", type=int, default=24, help="samples timed per stream")
    data.add_argument("--image-size", type=int, default=512, help="side of the generated 2D PNGs")
    data.add_argument("--global-crop-size", type=int, default=224)
    data.add_argument("--num-global-crops", type=int, default=2)
    data.add_argument("--local-crop-size", type=int, default=96)
    data.add_argument("--num-local-crops", type=int, default=6)
    data.add_argument("--num-slices", type=int, default=64)
    data.add_argument("--volume-size", type=int, default=128)
    data.add_argument("--volume-shape", type=int, nargs=3, default=(256, 256, 64), metavar=("H", "W", "D"))
    data.add_argument("--batch-size", type=int, default=64, help="2D images per GPU step (joint_swav.yaml)")
    data.add_argument("--volume-batch-size", type=int, default=4, help="volumes per GPU step (joint_swav.yaml)")
    data.add_argument("--gpu-img-s", type=float, default=2470.0,
                      help="assumed GPU training throughput, ResNet-50 images/s at 224 px, mixed precision")
    data.add_argument("--recompute", type=float, default=1.0 / 3.0,
                      help="extra fraction of the slices' cost for checkpointing (one more forward = 1/3)")
    # Internal: one memory configuration in this process, printed as JSON.
    parser.add_argument("--memory-worker", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    if parser.parse_known_args(argv)[0].quick:
        # Tiny defaults (options given explicitly still win).
        parser.set_defaults(backbone="resnet18", d_model=64, size=16, chunk_size=8, slices=[8, 16], agg_slices=[32],
                            steps=1, warmup_steps=0, samples=2, image_size=128, volume_shape=(64, 64, 16),
                            global_crop_size=64, local_crop_size=32, num_slices=16, volume_size=32)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- the variants
class SDPAAttention(nn.Module):
    """Full multi-head self-attention via scaled_dot_product_attention, on a deformable layer's projections."""

    def __init__(self, deformable: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.d_model = deformable.num_heads, deformable.head_dim, deformable.d_model
        self.query, self.key, self.value, self.output = (
            deformable.query, deformable.key, deformable.value, deformable.output)
        self.dropout = deformable.attention_dropout.p

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        batch, num_slices, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, num_slices, self.num_heads, self.head_dim).transpose(1, 2)

        mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0)
        return self.output(attended.transpose(1, 2).reshape(batch, num_slices, self.d_model))


def build_aggregators(d_model: int, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    deformable: SliceAggregator = AggregatorConfig().build(d_model)  # JointSSL's default f_inter
    # The same weights (max_points has no parameters) with ceil(N / downsample) keys per query: the aggregator
    # as it was before deformable_max_points.
    unbounded = copy.deepcopy(deformable)
    for layer in unbounded.layers:
        layer.attention.max_points = None
    sdpa = copy.deepcopy(deformable)
    for layer in sdpa.layers:
        layer.attention = SDPAAttention(layer.attention)
    return {"deformable": deformable.train(), "unbounded": unbounded.train(), "sdpa": sdpa.train()}


def aggregator_step(aggregator: nn.Module, tokens: Tensor) -> None:
    tokens.grad = None
    aggregator(tokens).square().mean().backward()


def joint_args(args: argparse.Namespace, num_slices: int) -> argparse.Namespace:
    """bench_joint_step's model/batch namespace: volumes only (the 2D images' cost does not depend on N)."""
    return argparse.Namespace(backbone=args.backbone, d_model=args.d_model, slices=num_slices, size=args.size,
                              volumes=args.volumes, images=0, crop_size=args.size, local_crops=0,
                              local_crop_size=args.size, seed=args.seed)


class Variants:
    """Builds each variant's step once per N (models shared between N; batches per N)."""

    def __init__(self, args: argparse.Namespace, names: set[str]) -> None:
        self.args = args
        self.model = bjs.build_model(joint_args(args, 0)) if names & {"joint", "joint ckpt"} else None
        self.aggregators = build_aggregators(args.d_model, args.seed) if names & set(AGGREGATOR_VARIANTS) else {}

    def step(self, variant: str, num_slices: int) -> Callable[[], None]:
        args = self.args
        if variant in ("joint", "joint ckpt"):
            model, batch = self.model, bjs.build_batch(joint_args(args, num_slices))
            chunk = args.chunk_size if variant == "joint ckpt" else 0

            def joint() -> None:
                model.zero_grad(set_to_none=True)
                bjs.configure(model, chunk, checkpoint=True)
                bjs.joint_step(model, batch)
            return joint
        aggregator = self.aggregators[variant]
        generator = torch.Generator().manual_seed(args.seed)
        tokens = torch.randn(2 * args.volumes, num_slices, args.d_model, generator=generator, requires_grad=True)

        def aggregate() -> None:
            aggregator.zero_grad(set_to_none=True)
            aggregator_step(aggregator, tokens)
        return aggregate


def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    configs = [(variant, n) for n in args.slices for variant in VARIANTS]
    configs += [(variant, n) for n in args.agg_slices for variant in AGGREGATOR_VARIANTS]
    return configs


# ---------------------------------------------------------------------------------------------- memory
def memory_worker(args: argparse.Namespace) -> None:
    variant, num_slices = args.memory_worker[0], int(args.memory_worker[1])
    torch.set_num_threads(args.threads)
    variants = Variants(args, {variant})
    step = variants.step(variant, num_slices)
    import gc

    gc.collect()
    baseline_kib = bjs.read_status_kib("VmRSS")
    result = bjs.measure_peak(step)
    print("RESULT " + json.dumps({"variant": variant, "slices": num_slices, "baseline_kib": baseline_kib, **result}),
          flush=True)


def forwarded(args: argparse.Namespace) -> list[str]:
    options = ["--backbone", args.backbone, "--d-model", str(args.d_model), "--size", str(args.size),
               "--volumes", str(args.volumes), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
               "--seed", str(args.seed)]
    return options


def measure_memory(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Every configuration in its own process, --memory-jobs at a time (a process's peak does not depend on
    the others; only its time would)."""
    from concurrent.futures import ThreadPoolExecutor

    net: dict[str, dict[int, float]] = {variant: {} for variant in VARIANTS}

    def one(config: tuple[str, int]) -> None:
        variant, n = config
        print(f"  [memory] {variant} N={n}: load {bjs.load_text()}", flush=True)
        result = bjs.run_worker([str(Path(__file__).resolve()), *forwarded(args), "--memory-worker", variant, str(n)],
                                f"{variant} N={n}")
        net[variant][n] = (result["peak_kib"] - result["baseline_kib"]) / bjs.KIB_PER_MIB

    with ThreadPoolExecutor(max_workers=max(1, args.memory_jobs)) as pool:
        list(pool.map(one, configurations(args)))
    return {variant: dict(sorted(per.items())) for variant, per in net.items()}


# ---------------------------------------------------------------------------------------------- time
def measure_time(args: argparse.Namespace) -> dict[str, dict[str, dict[int, list[float]]]]:
    torch.set_num_threads(args.threads)
    configs = configurations(args)
    variants = Variants(args, {variant for variant, _ in configs})
    steps = {config: variants.step(*config) for config in configs}
    times: dict[str, dict[str, dict[int, list[float]]]] = {
        clock: {variant: {} for variant in VARIANTS} for clock in ("wall", "cpu")}
    for iteration in range(args.warmup_steps + args.steps):
        kind = "warm-up" if iteration < args.warmup_steps else "measured"
        shift = iteration % len(configs)
        order = configs[shift:] + configs[:shift]
        print(f"  [time] round {iteration + 1}/{args.warmup_steps + args.steps} ({kind}): load {bjs.load_text()}",
              flush=True)
        for variant, n in order:
            wall, cpu = time.perf_counter(), time.process_time()
            steps[(variant, n)]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if iteration >= args.warmup_steps:
                times["wall"][variant].setdefault(n, []).append(wall)
                times["cpu"][variant].setdefault(n, []).append(cpu)
    return times


def fit(ns: list[int], values: list[float]) -> dict[str, float]:
    """Exponent b of value = a N^b (log-log least squares; and between the last two N); value = c + d N."""
    if len(ns) < 2:
        return {}
    x, y = np.log(ns), np.log(values)
    slope = float(np.polyfit(x, y, 1)[0])
    last = float((y[-1] - y[-2]) / (x[-1] - x[-2]))
    d, c = np.polyfit(np.asarray(ns, float), np.asarray(values, float), 1)
    predicted = c + d * np.asarray(ns, float)
    residual = float(np.max(np.abs(predicted - values) / np.asarray(values)))
    return {"exponent": slope, "exponent_last_two": last, "intercept": float(c), "per_slice": float(d),
            "linear_max_rel_error": residual}


def report_slices(args: argparse.Namespace, memory: dict | None, times: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {"memory_net_mib": memory, "fits": {}}
    if times is not None:
        med = {clock: {v: {n: statistics.median(t) for n, t in per.items()} for v, per in by.items()}
               for clock, by in times.items()}
        out["time_median_s"] = med
        out["time_all_s"] = times
        all_ns = sorted({n for v in VARIANTS for n in med["wall"][v]})
        print(f"\nTime per step (median of {args.steps}; wall s / process CPU s), {args.threads} thread(s):")
        print(f"  {'N':>5}" + "".join(f"{v:>22}" for v in VARIANTS) + f"{'ckpt/joint':>12}{'sdpa/deform':>13}")
        for n in all_ns:
            row = f"  {n:>5}"
            for v in VARIANTS:
                row += (f"{med['wall'][v][n]:>12.3f} /{med['cpu'][v][n]:>8.3f}" if n in med["wall"][v]
                        else f"{'-':>22}")
            ckpt = (med["wall"]["joint ckpt"][n] / med["wall"]["joint"][n]) if n in med["wall"]["joint"] else None
            ratio = med["wall"]["sdpa"][n] / med["wall"]["deformable"][n]
            row += (f"{ckpt:>11.2f}x" if ckpt else f"{'-':>12}") + f"{ratio:>12.2f}x"
            print(row)
        print("  fits of wall time (and process CPU time) against N: time = a N^b; time = c + d N")
        for clock in ("wall", "cpu"):
            for v in VARIANTS:
                for label, ns in (("swept N", sorted(n for n in med[clock][v] if n in args.slices)),
                                  ("all N", sorted(med[clock][v]))):
                    if label == "all N" and v not in AGGREGATOR_VARIANTS:
                        continue
                    result = fit(ns, [med[clock][v][n] for n in ns])
                    out["fits"][f"{clock} {v} {label}"] = result
                    if result:
                        print(f"    {clock:<5}{v:<12}{label:<9} b = {result['exponent']:.2f} (last two N:"
                              f" {result['exponent_last_two']:.2f}); c = {result['intercept']:.3f} s, d ="
                              f" {1000 * result['per_slice']:.2f} ms/slice, worst rel. error of the line"
                              f" {100 * result['linear_max_rel_error']:.0f}%")
    if memory is not None:
        print("\nPeak memory, net MiB (VmHWM minus the resident set once built; one fresh process each):")
        all_ns = sorted({n for v in VARIANTS for n in memory[v]})
        print(f"  {'N':>5}" + "".join(f"{v:>13}" for v in VARIANTS) + f"{'ckpt/joint':>12}{'sdpa/deform':>13}")
        for n in all_ns:
            row = f"  {n:>5}" + "".join(f"{memory[v][n]:>13.0f}" if n in memory[v] else f"{'-':>13}" for v in VARIANTS)
            if n in memory["joint"]:
                row += f"{memory['joint ckpt'][n] / memory['joint'][n]:>11.2f}x"
            else:
                row += f"{'-':>12}"
            row += f"{memory['sdpa'][n] / max(memory['deformable'][n], 1e-9):>12.2f}x"
            print(row)
        for v in VARIANTS:
            ns = sorted(n for n in memory[v] if memory[v][n] > 0)
            if len(ns) >= 2:
                result = fit(ns, [memory[v][n] for n in ns])
                out["fits"][f"memory {v}"] = result
                print(f"    memory {v:<12} b = {result['exponent']:.2f} (last two N: {result['exponent_last_two']:.2f})")
    return out


def plot_slices(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"joint": "o-", "joint ckpt": "s-", "deformable": "^-", "unbounded": "<--", "sdpa": "v-"}
    if "time_median_s" in result:
        ax = axes[0]
        med = result["time_median_s"]["cpu"]
        for v in VARIANTS:
            ns = sorted(int(n) for n in med[v])
            if ns:
                ax.plot(ns, [med[v][n] for n in ns], styles[v], label=v)
        ns = sorted(int(n) for n in med["deformable"])
        ref = med["deformable"][ns[0]]
        ax.plot(ns, [ref * n / ns[0] for n in ns], "k:", lw=1, label="slope 1 (from deformable N min)")
        ax.set(xscale="log", yscale="log", xlabel="slices per view N", ylabel="process CPU s per step (median)",
               title=f"time, forward + backward ({args.threads} thread)")
        ax.legend(fontsize=8)
        ax.set_xticks(ns, [str(n) for n in ns], minor=False)
        ax.minorticks_off()
    if result.get("memory_net_mib"):
        ax = axes[1]
        mem = result["memory_net_mib"]
        for v in VARIANTS:
            ns = sorted(int(n) for n in mem[v] if mem[v][n] > 0)
            if ns:
                ax.plot(ns, [mem[v][n] for n in ns], styles[v], label=v)
        ax.set(xscale="log", yscale="log", xlabel="slices per view N", ylabel="net peak MiB (VmHWM)",
               title="peak memory of one step")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.backbone} d_model {args.d_model}, {args.volumes} volumes x 2 views x N slices of "
                 f"{args.size} px; aggregator: {2 * args.volumes} sequences", fontsize=9)
    fig.tight_layout()
    path = Path(args.plot_dir) / "scaling_slices.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    written.append(str(path))
    plt.close(fig)
    return written


# ---------------------------------------------------------------------------------------------- data
def per_sample(fn: Callable[[int], object], count: int) -> dict[str, float]:
    fn(0)  # warm-up (first-call costs)
    walls, cpus = [], []
    for i in range(count):
        wall, cpu = time.perf_counter(), time.process_time()
        fn(i)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus),
            "cpu_ms_mean": 1000 * statistics.mean(cpus)}


def measure_data(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    from bench_volume_loader import write_volumes
    from jointssl.data.datasets import ImageDataset
    from jointssl.data.image_io import load_image_2d
    from jointssl.data.discovery import ImageRecord
    from jointssl.data.transforms import MultiCropTransform
    from jointssl.data.volume_datasets import CachedVolumes, VolumeDataset
    from jointssl.data.volume_transforms import VolumeViews

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(args.seed)
        side = args.image_size
        y, x = np.mgrid[:side, :side]
        paths = []
        for i in range(args.samples):
            image = 128 + 60 * np.sin(x / 17.0 + i) * np.cos(y / 23.0) + rng.normal(0, 12, (side, side))
            path = folder / f"image_{i:03d}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(path)
            paths.append(str(path))
        records = [ImageRecord(p, "bench") for p in paths]
        transform = MultiCropTransform(global_crop_size=args.global_crop_size, num_global_crops=args.num_global_crops,
                                       local_crop_size=args.local_crop_size, num_local_crops=args.num_local_crops)
        dataset = ImageDataset(records, transform)
        decoded = [torch.from_numpy(load_image_2d(p)).unsqueeze(0) for p in paths]
        n = len(paths)
        print(f"  [data] 2D: {n} PNGs of {side} px, {transform}: load {bjs.load_text()}", flush=True)
        result["2d_decode"] = per_sample(lambda i: load_image_2d(paths[i % n]), n)
        result["2d_augment"] = per_sample(lambda i: transform(decoded[i % n]), n)
        result["2d_sample"] = per_sample(lambda i: dataset[i % n], n)

        (folder / "volumes").mkdir()
        count = max(2, min(args.samples, 12))
        volumes = write_volumes(folder / "volumes", count, tuple(args.volume_shape), seed=args.seed)
        load_kwargs = {"in_plane_size": args.volume_size}
        views = VolumeViews(num_slices=args.num_slices, size=args.volume_size, seed=args.seed)
        cache = str(folder / "cache")
        volume_dataset = VolumeDataset(volumes, load_kwargs, views, cache_dir=cache)
        for i in range(count):  # fill the disk cache outside the timing
            volume_dataset.volumes[i]
        cached = CachedVolumes(volumes, load_kwargs, cache_dir=cache)
        print(f"  [data] 3D: {count} volumes of {tuple(args.volume_shape)}, views {args.num_slices} x "
              f"{args.volume_size} px from the disk cache: load {bjs.load_text()}", flush=True)
        repeat = max(args.samples, count)
        result["3d_cached_load"] = per_sample(lambda i: cached[i % count], repeat)
        result["3d_sample"] = per_sample(lambda i: volume_dataset[i % count], repeat)
    return result


def loader_cores(args: argparse.Namespace, costs: dict[str, Any]) -> dict[str, Any]:
    """Cores needed per GPU: (samples/s the GPU consumes) x (CPU s per sample), per stream."""
    reference = 224 * 224
    crops = (args.num_global_crops * args.global_crop_size ** 2 + args.num_local_crops * args.local_crop_size ** 2)
    image_equiv = args.batch_size * crops / reference
    slices = args.volume_batch_size * 2 * args.num_slices
    slice_equiv = slices * args.volume_size ** 2 / reference * (1 + args.recompute)
    step_s = (image_equiv + slice_equiv) / args.gpu_img_s
    steps_per_s = 1 / step_s
    need_2d = args.batch_size * steps_per_s * costs["2d_sample"]["cpu_ms"] / 1000
    need_3d = args.volume_batch_size * steps_per_s * costs["3d_sample"]["cpu_ms"] / 1000
    return {"image_equiv_224": image_equiv, "slice_equiv_224": slice_equiv, "step_s": step_s,
            "steps_per_s": steps_per_s, "images_per_s": args.batch_size * steps_per_s,
            "volumes_per_s": args.volume_batch_size * steps_per_s, "cores_2d": need_2d, "cores_3d": need_3d,
            "cores_total": need_2d + need_3d, "gpu_img_s": args.gpu_img_s}


def report_data(args: argparse.Namespace, costs: dict[str, Any]) -> dict[str, Any]:
    print(f"\nPer-sample cost ({args.threads} torch thread; median of {args.samples}; ms wall / ms process CPU):")
    for key, label in (("2d_decode", "2D decode (PNG -> float)"), ("2d_augment", "2D multi-crop only"),
                       ("2d_sample", "2D sample (decode + crops)"), ("3d_cached_load", "3D cached load only"),
                       ("3d_sample", "3D sample (load + 2 views)")):
        print(f"  {label:<30}{costs[key]['wall_ms']:>9.1f}{costs[key]['cpu_ms']:>9.1f}")
    feed = loader_cores(args, costs)
    print(f"\nAssumed GPU: {args.gpu_img_s:.0f} ResNet-50 training images/s at 224 px (mixed precision) ->"
          f" joint step of {feed['image_equiv_224']:.0f} + {feed['slice_equiv_224']:.0f} 224-px image equivalents"
          f" (2D crops + slices incl. {100 * args.recompute:.0f}% recompute) = {feed['step_s']:.3f} s/step,"
          f" {feed['images_per_s']:.0f} images/s + {feed['volumes_per_s']:.1f} volumes/s")
    print(f"  loader cores needed: 2D {feed['cores_2d']:.1f} + 3D {feed['cores_3d']:.1f} ="
          f" {feed['cores_total']:.1f} cores per GPU")
    return {"costs": costs, "feed": feed}


def plot_data(args: argparse.Namespace, result: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs, feed = result["costs"], result["feed"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = ["2D decode", "2D crops", "3D cached load", "3D views"]
    values = [costs["2d_decode"]["cpu_ms"], costs["2d_augment"]["cpu_ms"], costs["3d_cached_load"]["cpu_ms"],
              max(costs["3d_sample"]["cpu_ms"] - costs["3d_cached_load"]["cpu_ms"], 0.0)]
    axes[0].barh(labels, values, color=["C0", "C0", "C1", "C1"])
    axes[0].set(xlabel="CPU ms per sample (1 thread)", title="per-sample cost")
    rates = np.linspace(500, 6000, 50)
    scale = rates / feed["gpu_img_s"]
    axes[1].plot(rates, feed["cores_2d"] * scale, label="2D stream")
    axes[1].plot(rates, feed["cores_3d"] * scale, label="3D stream")
    axes[1].plot(rates, feed["cores_total"] * scale, "k-", label="total")
    axes[1].axvline(feed["gpu_img_s"], color="grey", ls=":", label=f"assumed {feed['gpu_img_s']:.0f} img/s")
    axes[1].set(xlabel="GPU ResNet-50 training img/s at 224 px (assumption)", ylabel="loader cores per GPU",
                title="cores to feed one GPU")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(args.plot_dir) / "data_loading_cost.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


# ---------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.memory_worker is not None:
        memory_worker(args)
        return {}
    print(f"bench_scaling {' '.join(sys.argv[1:])}: torch {torch.__version__}, {args.threads} thread(s), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {os.cpu_count()} CPUs, load {bjs.load_text()}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    result: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "memory_worker"}}
    plots: list[str] = []
    if args.part in ("slices", "all"):
        print(f"slices: {args.backbone} (d_model {args.d_model}), {args.volumes} volumes x 2 views x N slices of "
              f"{args.size} px, no 2D images; ckpt: chunks of {args.chunk_size}; aggregator: {2 * args.volumes} "
              f"sequences of N tokens; N = {args.slices} (+ {args.agg_slices} aggregator only)", flush=True)
        memory = None if args.skip_memory else measure_memory(args)
        times = None if args.skip_time else measure_time(args)
        result["slices"] = report_slices(args, memory, times)
        if args.plot:
            plots += plot_slices(args, result["slices"])
    if args.part in ("data", "all"):
        result["data"] = report_data(args, measure_data(args))
        if args.plot:
            plots += plot_data(args, result["data"])
    result["load_end"] = bjs.load_text()
    print(f"  load at end {bjs.load_text()}" + (f"; plots: {', '.join(plots)}" if plots else ""))
    if args.output:
        write_json(args.output, result, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()

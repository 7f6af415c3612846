"""GPU check: the joint pretraining step at the reference shapes with configs/trainer/gpu.yaml's settings, on one GPU.

What runs, per variant (built from the same seed, so with the same weights), each after its own warm-up:
one training step as Lightning's DDP strategy runs it: ``intra/inter.before_step()``, ``JointSSL.compute_losses``
under autocast (``precision: bf16-mixed``: bf16 autocast; fp32 variants without), backward through
``DistributedDataParallel`` on a 1-process group (NCCL), BatchNorm converted to ``SyncBatchNorm``
(``sync_batchnorm: true``), then an SGD-momentum update (the LARS of ``configure_optimizers`` needs a Trainer;
its per-parameter norms are a small part of a step). The batch is configs/pretrain/joint_swav.yaml's per-GPU batch
(64 images x (2 x 224 px + 6 x 96 px crops) + 4 volumes x 2 views x 64 slices of 128 px; resnet50, d_model 640,
3000 / 300 prototypes, slice_chunk_size 64 with checkpointing), random pixels.

Printed per variant (one ``RESULT`` line each, as soon as it is measured): images/s (images through f_intra: 2D
crops + real slices of both views), step time (median of the measured steps), peak memory
(``torch.cuda.max_memory_allocated`` over the variant's steps) and model FLOP utilisation: the FLOPs of one step
counted with ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward, eager; the recomputation of
checkpointed chunks is counted apart and left out of the model FLOPs, as MFU is defined) over the step time and the
chip's dense bf16 peak (``PEAK_BF16_TFLOPS`` by device name, or ``--peak-tflops``).

Variants are ``+``-joined tokens: ``bf16`` or ``fp32``, and optionally ``channels_last`` and ``compile`` (the
slice encoder's GPU options, ``SliceEncoder.enable_compile``, torch.compile of the CNN with ``--compile-backend``).

    bash benchmarks/gpu_check.sh                  # one GPU, under 5 minutes
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # the same code on CPU, tiny shapes, seconds

``--dry-run`` differs only in shapes, steps, device (CPU, gloo), compile backend ("eager": dynamo's tracing
without inductor's code generation, which takes minutes on CPU) and SyncBatchNorm: torch's SyncBatchNorm refuses
CPU tensors once a process group exists (also with one process), so on CPU BatchNorm stays BatchNorm.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import socket
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

from jointssl.pretrain import JointSSL

#: Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets; matched in this order against
#: torch.cuda.get_device_name() (first substring match wins, so the more specific names come first).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100", 989.0),   # SXM
    ("H200", 989.0),   # SXM
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10", 125.0),
]

REFERENCE = dict(  # configs/pretrain/joint_swav.yaml, per GPU
    backbone="resnet50", d_model=640, num_prototypes=3000, num_prototypes_3d=300, images=64, crop_size=224,
    local_crops=6, local_crop_size=96, volumes=4, slices=64, size=128, slice_chunk_size=64, steps=10,
    warmup_steps=3, variants=["bf16", "bf16+channels_last", "bf16+channels_last+compile"],
    compile_backend="inductor",
)
DRY_RUN = dict(
    backbone="test_resnet", d_model=32, num_prototypes=12, num_prototypes_3d=6, images=4, crop_size=32,
    local_crops=2, local_crop_size=16, volumes=2, slices=8, size=32, slice_chunk_size=4, steps=1, warmup_steps=1,
    variants=REFERENCE["variants"], compile_backend="eager",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps (seconds)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda (cpu with --dry-run); cpu without --dry-run measures CPU ratios")
    for name, default in REFERENCE.items():
        flag = "--" + name.replace("_", "-")
        if name == "variants":
            parser.add_argument(flag, nargs="+", default=None, help=f"default {default} (dry run {DRY_RUN[name]})")
        else:
            parser.add_argument(flag, type=type(default), default=None,
                                help=f"default {default} (dry run {DRY_RUN[name]})")
    parser.add_argument("--no-checkpoint", action="store_true", help="chunks without activation checkpointing")
    parser.add_argument("--no-sync-batchnorm", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the chip's dense bf16 peak in TFLOP/s (default: from the table by device name)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU runs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = DRY_RUN if args.dry_run else REFERENCE
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.device is None:
        args.device = "cpu" if args.dry_run else "cuda"
    for variant in args.variants:
        parse_variant(variant, parser.error)
    if args.images == 1 or args.volumes == 1:
        parser.error("--images and --volumes must be 0 or >= 2 (BatchNorm in the projection heads)")
    return args


def parse_variant(variant: str, error: Any = None) -> dict[str, Any]:
    tokens = variant.split("+")
    precision = tokens[0]
    flags = set(tokens[1:])
    if precision not in ("bf16", "fp32") or not flags <= {"channels_last", "compile"} or len(flags) != len(tokens) - 1:
        message = f"variant {variant!r}: expected bf16 or fp32, then optionally +channels_last, +compile"
        if error is None:
            raise ValueError(message)
        error(message)
    return {"bf16": precision == "bf16", "channels_last": "channels_last" in flags, "compile": "compile" in flags}


# ---------------------------------------------------------------------- model, batch, step
def build_model(args: argparse.Namespace, channels_last: bool, device: torch.device) -> JointSSL:
    torch.manual_seed(args.seed)
    model = JointSSL(
        backbone=args.backbone, d_model=args.d_model, num_prototypes=[args.num_prototypes],
        num_prototypes_3d=[args.num_prototypes_3d], slice_chunk_size=args.slice_chunk_size,
        checkpoint_slices=not args.no_checkpoint,
    )
    if channels_last:
        # JointSSL(channels_last=True) does the same in its constructor.
        model.encoder.enable_channels_last()
    if device.type == "cuda" and not args.no_sync_batchnorm:
        # What Lightning does for sync_batchnorm: true (before wrapping in DDP).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device).train()


def build_batch(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed)
    batch: dict[str, Any] = {}
    if args.images:
        sizes = [args.crop_size] * 2 + [args.local_crop_size] * args.local_crops
        batch["images"] = {
            "crops": [torch.randn(args.images, 1, s, s, generator=generator).to(device) for s in sizes],
            "index": torch.arange(args.images, device=device),
        }
    if args.volumes:
        batch["volumes"] = {
            "views": torch.randn(args.volumes, 2, args.slices, 1, args.size, args.size, generator=generator).to(device),
            "padding_mask": torch.zeros(args.volumes, args.slices, dtype=torch.bool, device=device),
            "index": torch.arange(args.volumes, device=device),
        }
    if not batch:
        raise SystemExit("gpu_check: nothing to run: --images and --volumes are both 0")
    return batch


def images_per_step(args: argparse.Namespace) -> int:
    return args.images * (2 + args.local_crops) + 2 * args.volumes * args.slices


class _Loss(nn.Module):
    """The training step's forward as DDP sees it (Lightning's DDP also wraps the whole LightningModule)."""

    def __init__(self, model: JointSSL) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> Tensor:
        self.model.intra.before_step()
        self.model.inter.before_step()
        return self.model.compute_losses(batch)["loss"]


class Runner:
    """One variant's model, DDP wrapper and optimizer; `step()` is one training step."""

    def __init__(self, args: argparse.Namespace, variant: str, device: torch.device) -> None:
        options = parse_variant(variant)
        self.variant, self.device = variant, device
        self.model = build_model(args, options["channels_last"], device)
        if options["compile"]:
            # JointSSL(compile_encoder=True) does the same with the default backend (inductor).
            self.model.encoder.enable_compile(backend=args.compile_backend)
        # find_unused_parameters=False, as Lightning's "ddp" strategy: a parameter left out of a step fails here too.
        self.ddp = DistributedDataParallel(_Loss(self.model), device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.autocast = options["bf16"]

    def forward_context(self) -> contextlib.AbstractContextManager:
        # Lightning's MixedPrecision("bf16-mixed") plugin: torch.autocast(device, dtype=torch.bfloat16).
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: dict[str, Any]) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        # On CPU, oneDNN's bf16 convolution backward gives NaN gradients on 1x1 inputs (uninitialised memory; the
        # dry run's test_resnet at 32 px reaches 1x1): bf16 runs there without oneDNN (benchmarks/README.md, GPU
        # options; onednn_bf16_conv.py). Not on a GPU, where the convolutions are cuDNN's.
        without_onednn = self.autocast and self.device.type == "cpu"
        with torch.backends.mkldnn.flags(enabled=not without_onednn):
            with self.forward_context():
                loss = self.ddp(batch)
            loss.backward()
        self.optimizer.step()
        return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(args: argparse.Namespace, variant: str, batch: dict[str, Any], device: torch.device) -> dict[str, int]:
    """FLOPs of one step of an eager (uncompiled) model of `variant`'s precision: total, and the part spent
    recomputing checkpointed chunks in backward (f_intra's forward run again inside the backward pass)."""
    options = parse_variant(variant)
    runner = Runner(args, "bf16" if options["bf16"] else "fp32", device)
    counter = FlopCounterMode(display=False)
    recompute = {"flops": 0, "start": 0}

    def before(module: nn.Module, inputs: Any) -> None:
        recompute["start"] = counter.get_total_flops()

    def after(module: nn.Module, inputs: Any, output: Any) -> None:
        if torch._C._current_graph_task_id() != -1:  # running inside autograd's backward: a recomputation
            recompute["flops"] += counter.get_total_flops() - recompute["start"]

    # On f_intra's children: checkpointing calls SliceEncoder.forward itself, which bypasses the encoder's own hooks.
    hooks = []
    for child in runner.model.encoder.children():
        hooks += [child.register_forward_pre_hook(before), child.register_forward_hook(after)]
    try:
        with counter:
            runner.step(batch)
    finally:
        for hook in hooks:
            hook.remove()
    total = counter.get_total_flops()
    del runner
    release(device)
    return {"total": total, "recompute": recompute["flops"], "model": total - recompute["flops"]}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"table entry {key!r}"
    return None, f"{name!r} is not in PEAK_BF16_TFLOPS (pass --peak-tflops)"


def measure(args: argparse.Namespace, variant: str, batch: dict[str, Any], device: torch.device,
            model_flops: int, peak: float | None) -> dict[str, Any]:
    started = time.perf_counter()
    runner = Runner(args, variant, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for iteration in range(args.warmup_steps + args.steps):
        synchronize(device)
        start = time.perf_counter()
        losses.append(runner.step(batch))
        synchronize(device)
        if iteration >= args.warmup_steps:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    losses_host = torch.stack(losses).float().cpu()
    result = {
        "variant": variant,
        "images_per_s": images_per_step(args) / step_s,
        "step_ms": 1000 * step_s,
        "min_step_ms": 1000 * min(times),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "model_tflops_per_s": model_flops / step_s / 1e12,
        "mfu": model_flops / step_s / (peak * 1e12) if peak else None,
        "first_loss": float(losses_host[0]),
        "last_loss": float(losses_host[-1]),
        "finite": bool(torch.isfinite(losses_host).all()),
        "variant_s": time.perf_counter() - started,  # build + warm-up (compilation) + measured steps
    }
    del runner
    release(device)
    return result


def format_result(result: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)
    return (f"RESULT variant={result['variant']} images_per_s={result['images_per_s']:.1f} "
            f"step_ms={result['step_ms']:.1f} min_step_ms={result['min_step_ms']:.1f} "
            f"peak_memory_mib={fmt(result['peak_memory_mib'], '.0f')} "
            f"model_tflops_per_s={result['model_tflops_per_s']:.4g} mfu={fmt(result['mfu'], '.3f')} "
            f"loss={result['first_loss']:.4f}->{result['last_loss']:.4f} finite={result['finite']} "
            f"variant_s={result['variant_s']:.1f}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, or use --dry-run "
              "(CPU, tiny shapes) or --device cpu.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 variants: what a GPU user runs with
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
            name = f"{torch.cuda.get_device_name(device)} ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
        else:
            name = f"CPU, {torch.get_num_threads()} threads"
        sync_bn = device.type == "cuda" and not args.no_sync_batchnorm
        print(f"gpu_check{' (dry run)' if args.dry_run else ''}: {name}, torch {torch.__version__}, {backend} "
              f"process group of 1, SyncBatchNorm {'on' if sync_bn else 'off'}, {args.backbone} d_model "
              f"{args.d_model}, {args.images} images x (2 x {args.crop_size} + {args.local_crops} x "
              f"{args.local_crop_size} px) + {args.volumes} volumes x 2 x {args.slices} slices of {args.size} px "
              f"= {images_per_step(args)} images per step, chunk {args.slice_chunk_size}"
              f"{'' if args.no_checkpoint else ' + checkpoint'}, {args.warmup_steps} warm-up + {args.steps} "
              f"measured steps per variant, compile backend {args.compile_backend}", flush=True)
        batch = build_batch(args, device)
        peak, peak_source = peak_tflops(args, device)
        flops = count_flops(args, args.variants[0], batch, device)
        print(f"FLOPS per step (FlopCounterMode, eager): model {flops['model'] / 1e12:.4g} TFLOP, recomputation "
              f"of checkpointed chunks {flops['recompute'] / 1e12:.4g} TFLOP (not in the model FLOPs); peak "
              f"{'n/a' if peak is None else f'{peak:g} TFLOP/s'} ({peak_source})", flush=True)
        results = []
        for variant in args.variants:
            results.append(measure(args, variant, batch, device, flops["model"], peak))
            print(format_result(results[-1]), flush=True)
        best = min(results, key=lambda r: r["step_ms"])
        reference = results[0]
        print("SUMMARY " + ", ".join(f"{r['variant']} {r['step_ms'] / reference['step_ms']:.3f}x"
                                     for r in results) + f" step time of {reference['variant']}; fastest: "
              f"{best['variant']}", flush=True)
        return 0 if all(r["finite"] for r in results) else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

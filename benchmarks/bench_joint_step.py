"""Cost of one joint pretraining step (JointSSL.compute_losses + backward): memory with and without chunked
activation checkpointing of f_intra, and time relative to f_intra alone.

Two measurements, printed side by side as ratios:

1. **Memory.** Each configuration (no chunking; ``slice_chunk_size=c`` with ``checkpoint_slices=True`` for each
   ``--chunk-sizes`` c) runs in its own fresh interpreter (a subprocess of this script). CPU PyTorch has no
   ``max_memory_allocated``, so the peak is the process's resident-set high-water mark (``VmHWM`` in
   /proc/self/status): *raw* is the peak itself, *net* is the peak minus the resident set once the model and the
   batch are built (what the step itself adds: activations, gradients, workspaces). Before each measured step the
   high-water mark is reset (``echo 5 > /proc/self/clear_refs``) so that every step is measured on its own. The
   workers run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor-sized
   block is then mapped on allocation and unmapped on free, so the resident set follows the live tensors instead
   of glibc's freed-but-kept heap (which would make the number depend on the allocation history).
   ``--profiler-check`` adds, per configuration, the peak of live tensor bytes of one more step replayed from
   ``torch.profiler(profile_memory=True)`` allocation events: an independent cross-check (slow).
2. **Time.** In this process, on one model and one batch, interleaved round-robin step by step (the order
   rotated every round): the joint step (all three losses) without chunking; f_intra alone
   (``JointSSL.volume_encoder.encode``) on exactly the tensors the joint step sends through it (the 2D crops and the real slices of both views,
   grouped per resolution the same way) with the trivial loss sum(outputs); the joint step with checkpointing at
   each ``--chunk-sizes``; and the joint step chunked without checkpointing at each ``--plain-chunk-sizes`` (which
   separates the recomputation cost from the effect of smaller batches). Median and minimum over the measured
   steps (after warm-up) of wall time, of process CPU time (all threads; steadier on a shared machine) and of its
   user part, with the ratios to f_intra alone (target for the joint step: <= 1.15) and to the plain joint step.

Run from the repository root (the defaults are the reference shapes on a CPU-sized batch; at 2 threads the whole
run takes about 40 minutes, a round of the time measurement about 5):

    .venv/bin/python benchmarks/bench_joint_step.py
    .venv/bin/python benchmarks/bench_joint_step.py --slices 16 --size 64 --volumes 2 --images 4 --crop-size 64 \
        --chunk-sizes 8 16 --plain-chunk-sizes --steps 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from jointssl.pretrain import JointSSL

KIB_PER_MIB = 1024.0
#: glibc tunables of the memory workers (see the module docstring).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shapes = parser.add_argument_group("model and batch")
    shapes.add_argument("--backbone", default="resnet50")
    shapes.add_argument("--d-model", type=int, default=640)
    shapes.add_argument("--slices", type=int, default=64, help="slices per volume view (N)")
    shapes.add_argument("--size", type=int, default=128, help="in-plane size of the volume slices")
    shapes.add_argument("--volumes", type=int, default=2, help="volumes per step (each gives two views)")
    shapes.add_argument("--images", type=int, default=8, help="2D images per step (0: none)")
    shapes.add_argument("--crop-size", type=int, default=128, help="size of the two global crops of each image")
    shapes.add_argument("--local-crops", type=int, default=0, help="local crops per image")
    shapes.add_argument("--local-crop-size", type=int, default=96)
    run = parser.add_argument_group("run")
    run.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 32], help="slice_chunk_size values")
    run.add_argument("--plain-chunk-sizes", type=int, nargs="*", default=[32],
                     help="time: also the joint step chunked at these sizes without checkpointing")
    run.add_argument("--steps", type=int, default=3, help="measured steps per variant (time)")
    run.add_argument("--warmup-steps", type=int, default=1, help="unmeasured steps per variant first (time)")
    run.add_argument("--memory-steps", type=int, default=1, help="measured steps per memory configuration")
    run.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    run.add_argument("--max-load", type=float, default=2.5, help="wait until the 1-min load average is below")
    run.add_argument("--max-wait", type=float, default=900.0, help="give up waiting for the load after (s)")
    run.add_argument("--profiler-check", action="store_true",
                     help="memory: also the allocator peak of one more step from torch.profiler (slow)")
    run.add_argument("--skip-memory", action="store_true")
    run.add_argument("--skip-time", action="store_true")
    run.add_argument("--seed", type=int, default=0)
    # Internal: run one memory configuration in this process and print its result as JSON.
    run.add_argument("--memory-worker", type=int, default=None, metavar="CHUNK", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.volumes == 1 or args.images == 1:
        # The projection heads have BatchNorm: a training batch of one volume (or image) has no batch statistics.
        parser.error("--volumes and --images must be 0 or >= 2 (BatchNorm in the projection heads)")
    return args


# ---------------------------------------------------------------------- model, batch, steps
def build_model(args: argparse.Namespace) -> JointSSL:
    """The reference JointSSL (SwAV, default heads and aggregator) at the chosen backbone width, in train mode."""
    model = JointSSL(backbone=args.backbone, d_model=args.d_model)
    return model.train()


def build_batch(args: argparse.Namespace) -> dict[str, Any]:
    """A batch in JointDataModule's format: 2D crops and two full-length (unpadded) views per volume."""
    generator = torch.Generator().manual_seed(args.seed)
    batch: dict[str, Any] = {}
    if args.images > 0:
        sizes = [args.crop_size] * 2 + [args.local_crop_size] * args.local_crops
        batch["images"] = {
            "crops": [torch.randn(args.images, 1, s, s, generator=generator) for s in sizes],
            "index": torch.arange(args.images),
        }
    if args.volumes > 0:
        batch["volumes"] = {
            "views": torch.randn(args.volumes, 2, args.slices, 1, args.size, args.size, generator=generator),
            "padding_mask": torch.zeros(args.volumes, args.slices, dtype=torch.bool),
            "index": torch.arange(args.volumes),
        }
    if not batch:
        raise SystemExit("nothing to measure: --images and --volumes are both 0")
    return batch


def encoder_inputs(batch: dict[str, Any]) -> list[Tensor]:
    """The image batches JointSSL.compute_losses hands to `encode` for this batch (same order and selection)."""
    inputs: list[Tensor] = []
    if "images" in batch:
        inputs.extend(batch["images"]["crops"])
    if "volumes" in batch:
        views, real = batch["volumes"]["views"], ~batch["volumes"]["padding_mask"]
        inputs.extend([views[:, 0][real], views[:, 1][real]])
    return inputs


def configure(model: JointSSL, chunk_size: int, checkpoint: bool = True) -> None:
    """No chunking (0), or chunks of `chunk_size` slices, with activation checkpointing unless told not to."""
    # The VolumeEncoder reads its own copies of the settings (set from the hyper-parameters at construction).
    model.hparams.slice_chunk_size = model.volume_encoder.slice_chunk_size = chunk_size
    model.hparams.checkpoint_slices = model.volume_encoder.checkpoint_slices = checkpoint and chunk_size > 0


def joint_step(model: JointSSL, batch: dict[str, Any]) -> None:
    """Forward and backward of the joint loss (as `training_step`, without logging)."""
    model.intra.before_step()
    model.inter.before_step()
    model.compute_losses(batch)["loss"].backward()


def encoder_step(model: JointSSL, inputs: list[Tensor]) -> None:
    """f_intra alone on the same tensors, one batched pass per resolution, trivial loss."""
    torch.stack([features.sum() for features in model.volume_encoder.encode(inputs)]).sum().backward()


# ---------------------------------------------------------------------- memory (one configuration per process)
def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0). False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_peak(step: Callable[[], None]) -> dict[str, Any]:
    """Run `step` once with the resident-set high-water mark reset just before: its start and peak (KiB)."""
    gc.collect()
    resettable = reset_peak_rss()
    start_kib = read_status_kib("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"start_kib": start_kib, "peak_kib": read_status_kib("VmHWM"), "resettable": resettable,
            "wall_s": wall, "cpu_s": cpu}


def memory_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    chunk_size = args.memory_worker
    model = build_model(args)
    configure(model, chunk_size)
    batch = build_batch(args)
    gc.collect()
    baseline_kib = read_status_kib("VmRSS")
    steps = []
    for _ in range(args.memory_steps):
        model.zero_grad(set_to_none=True)
        steps.append(measure_peak(lambda: joint_step(model, batch)))
    result = {
        "chunk_size": chunk_size,
        "profiler_peak_bytes": profiler_peak_bytes(model, batch) if args.profiler_check else None,
        "baseline_kib": baseline_kib,
        "steps": steps,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # Linux: KiB, whole process life
    }
    print("RESULT " + json.dumps(result), flush=True)


def profiler_peak_bytes(model: JointSSL, batch: dict[str, Any]) -> int:
    """Peak of the bytes allocated and not yet freed through PyTorch's CPU allocator during one joint step,
    replayed from the profiler's allocation events. A cross-check of the resident-set figure: it sees tensors
    only (no glibc overhead, no library workspaces allocated elsewhere) and slows the step down several times."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        joint_step(model, batch)
    # prof.events() keeps only the allocations outside any operator; the event tree has all of them.
    allocations: list[tuple[int, int]] = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def run_worker(argv: list[str], what: str) -> dict[str, Any]:
    """Run a Python worker (`argv` after the interpreter) in a fresh process with MALLOC_ENV; the JSON of its
    last 'RESULT ' line."""
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(
            f"memory worker ({what}) failed with exit code {proc.returncode} "
            f"(-9: killed, likely out of memory):\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT "):])


def run_memory_configuration(args: argparse.Namespace, chunk_size: int) -> dict[str, Any]:
    argv = [os.path.abspath(__file__), *forwarded_args(args), "--memory-worker", str(chunk_size)]
    return run_worker(argv, f"chunk {chunk_size}")


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The command-line options a memory worker needs to build the same model and batch."""
    names = ["backbone", "d_model", "slices", "size", "volumes", "images", "crop_size", "local_crops",
             "local_crop_size", "memory_steps", "threads", "seed"]
    options = [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]
    return options + (["--profiler-check"] if args.profiler_check else [])


def measure_memory(args: argparse.Namespace) -> None:
    configs = [0, *args.chunk_sizes]
    results = []
    for chunk_size in configs:
        print(f"  [memory] {config_name(chunk_size)}: load {load_text()}", flush=True)
        results.append(run_memory_configuration(args, chunk_size))
    if not all(step["resettable"] for r in results for step in r["steps"]):
        print("  note: /proc/self/clear_refs not writable; peaks after step 1 include the earlier steps")
    print(f"\nPeak memory of one joint step (forward + backward), one fresh process per configuration,"
          f" resident set (VmHWM), glibc mmap threshold 64 KiB; {args.memory_steps} step(s) each, the last shown:")
    header = (f"  {'configuration':<24}{'built MiB':>10}{'peak MiB':>10}{'net MiB':>9}{'net ratio':>11}"
              f"{'raw ratio':>11}")
    if args.profiler_check:
        header += f"{'profiler MiB':>14}{'ratio':>8}"
    print(header)
    reference = results[0]
    ref_peak = reference["steps"][-1]["peak_kib"]
    ref_net = ref_peak - reference["baseline_kib"]
    for result in results:
        step = result["steps"][-1]
        peak, built = step["peak_kib"], result["baseline_kib"]
        net = peak - built
        row = (f"  {config_name(result['chunk_size']):<24}{built / KIB_PER_MIB:>10.0f}{peak / KIB_PER_MIB:>10.0f}"
               f"{net / KIB_PER_MIB:>9.0f}{net / ref_net:>10.2f}x{peak / ref_peak:>10.2f}x")
        if args.profiler_check:
            profiled = result["profiler_peak_bytes"]
            row += f"{profiled / 2**20:>14.0f}{profiled / reference['profiler_peak_bytes']:>7.2f}x"
        print(row)
    if args.memory_steps > 1:
        print("  net MiB of every step (the first includes one-time allocations):")
        for result in results:
            nets = [f"{(s['peak_kib'] - result['baseline_kib']) / KIB_PER_MIB:.0f}" for s in result["steps"]]
            print(f"    {config_name(result['chunk_size']):<22}{', '.join(nets)}")
    if args.profiler_check:
        print("  profiler MiB: peak of live tensor bytes (c10 CPU allocator) during one more step, from"
              " torch.profiler(profile_memory=True) allocation events")
    print("  target: net ratio <= 0.5x with checkpointing")


# ---------------------------------------------------------------------- time (interleaved, one process)
def measure_time(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)
    batch = build_batch(args)
    inputs = encoder_inputs(batch)

    def joint_with(chunk_size: int, checkpoint: bool = True) -> Callable[[], None]:
        def step() -> None:
            configure(model, chunk_size, checkpoint)
            joint_step(model, batch)
        return step

    def encoder_alone() -> None:
        configure(model, 0)
        encoder_step(model, inputs)

    variants: dict[str, Callable[[], None]] = {"joint": joint_with(0), "encoder": encoder_alone}
    for chunk_size in args.chunk_sizes:
        variants[f"joint ckpt {chunk_size}"] = joint_with(chunk_size)
    for chunk_size in args.plain_chunk_sizes:
        # Chunks without checkpointing: separates the cost of recomputation from that of smaller batches.
        variants[f"joint chunk {chunk_size}"] = joint_with(chunk_size, checkpoint=False)

    # Wall time; process CPU time (all threads, user + system: steadier than wall time on a shared machine,
    # where other jobs stretch wall time while this process waits for a core); and its user part alone (the
    # system part is mostly page faults of freshly mapped activation memory, which varies with memory pressure).
    clocks = ("wall", "process CPU", "user CPU")
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in variants} for clock in clocks}
    names = list(variants)
    for iteration in range(args.warmup_steps + args.steps):
        kind = "warm-up" if iteration < args.warmup_steps else "measured"
        # Rotate the order every round so that no variant always runs right after the same other one.
        order = names[iteration % len(names):] + names[:iteration % len(names)]
        print(f"  [time] round {iteration + 1}/{args.warmup_steps + args.steps} ({kind}): load {load_text()}",
              flush=True)
        for name in order:
            model.zero_grad(set_to_none=True)  # outside the timing
            start = read_clocks()
            variants[name]()
            if iteration >= args.warmup_steps:
                for clock, begin, end in zip(clocks, start, read_clocks()):
                    times[clock][name].append(end - begin)

    print(f"\nStep time, variants interleaved step by step (order rotated every round), {args.steps} measured "
          f"step(s) after {args.warmup_steps} warm-up round(s):")
    for clock in clocks:
        print_time_table(clock, times[clock])
    print("  per-step values (wall s / process CPU s), in round order:")
    for name in names:
        pairs = ", ".join(f"{w:.1f}/{c:.1f}" for w, c in zip(times["wall"][name], times["process CPU"][name]))
        print(f"    {name:<16}{pairs}")
    print("  target: joint / encoder <= 1.15")


def read_clocks() -> tuple[float, float, float]:
    """(wall, process CPU = user + system, user CPU) seconds, for the whole process (all threads)."""
    return time.perf_counter(), time.process_time(), os.times().user


def print_time_table(clock: str, times: dict[str, list[float]]) -> None:
    medians = {name: statistics.median(values) for name, values in times.items()}
    minima = {name: min(values) for name, values in times.items()}
    print(f"  {clock} time per step:")
    print(f"    {'variant':<16}{'median s':>10}{'min s':>9}{'max s':>9}"
          f"{'/encoder med':>14}{'/encoder min':>14}{'/joint med':>12}{'/joint min':>12}")
    for name, values in times.items():
        row = f"    {name:<16}{medians[name]:>10.2f}{minima[name]:>9.2f}{max(values):>9.2f}"
        row += f"{medians[name] / medians['encoder']:>13.3f}x{minima[name] / minima['encoder']:>13.3f}x"
        row += f"{medians[name] / medians['joint']:>11.3f}x{minima[name] / minima['joint']:>11.3f}x"
        print(row)


# ---------------------------------------------------------------------- driver
def config_name(chunk_size: int) -> str:
    return "no chunking" if chunk_size == 0 else f"chunk {chunk_size} + checkpoint"


def load_text() -> str:
    return "/".join(f"{value:.2f}" for value in os.getloadavg())


def wait_for_quiet_machine(max_load: float, max_wait: float) -> None:
    """Other people's jobs on a shared machine distort the timings: wait (bounded) for the load to drop."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load:
        if time.monotonic() > deadline:
            print(f"  load still {load_text()} after {max_wait:.0f} s of waiting; measuring anyway", flush=True)
            return
        print(f"  load {load_text()} > {max_load}: waiting", flush=True)
        time.sleep(30)


def describe(args: argparse.Namespace) -> str:
    batch = build_batch(args)
    slices = sum(t.shape[0] for t in encoder_inputs(batch))
    parts = []
    if args.images:
        crops = f"2 x {args.crop_size} px"
        if args.local_crops:
            crops += f" + {args.local_crops} x {args.local_crop_size} px"
        parts.append(f"{args.images} images ({crops} crops)")
    if args.volumes:
        parts.append(f"{args.volumes} volumes x 2 views x {args.slices} slices of {args.size} px")
    return (f"{args.backbone} (d_model {args.d_model}), default heads and aggregator, SwAV; batch: "
            f"{' + '.join(parts)} = {slices} images through f_intra per step; CPU, {args.threads} threads, "
            f"torch {torch.__version__}")


def main() -> None:
    args = parse_args()
    if args.memory_worker is not None:
        memory_worker(args)
        return
    print(describe(args), flush=True)
    wait_for_quiet_machine(args.max_load, args.max_wait)
    print(f"  load at start {load_text()}", flush=True)
    if not args.skip_memory:
        measure_memory(args)
    if not args.skip_time:
        measure_time(args)
    print(f"  load at end {load_text()}")


if __name__ == "__main__":
    main()

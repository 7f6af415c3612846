"""oneDNN's CPU bf16 convolution backward on a 1x1 input: NaN gradients from uninitialised memory.

A 3x3, stride-2, padding-1 convolution whose input is 1x1 (a small ResNet's last stage at 32 px crops) returns
non-finite gradients in some calls under bf16 on CPU with oneDNN: the kernel reads memory it did not write, so the
result depends on what freed memory held before. Each trial first frees tensors filled with NaN (what an earlier
computation may leave behind), then runs one forward + backward and checks both gradients. The same shapes in
float32, larger inputs, stride 1, or bf16 with oneDNN switched off give no NaN. This is torch's kernel, not
jointssl's arithmetic; a user training on CPU with bf16-mixed and such small feature maps would see the numerics
guard skip those steps. GPUs use cuDNN instead.

    .venv/bin/python benchmarks/onednn_bf16_conv.py [--trials 50]
"""

from __future__ import annotations

import argparse

import torch


def non_finite_trials(size: int, stride: int, dtype: torch.dtype, onednn: bool, trials: int) -> int:
    bad = 0
    for _ in range(trials):
        junk = [torch.full((n,), float("nan"), dtype=d) for n in (1000, 20000, 500000)
                for d in (torch.float32, torch.bfloat16)]
        del junk
        x = torch.randn(4, 192, size, size, dtype=dtype, requires_grad=True)
        w = torch.randn(96, 192, 3, 3, dtype=dtype, requires_grad=True)
        with torch.backends.mkldnn.flags(enabled=onednn):
            y = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
            y.float().square().sum().backward()
        bad += int(not (torch.isfinite(w.grad).all() and torch.isfinite(x.grad).all()))
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, oneDNN available: {torch.backends.mkldnn.is_available()}")
    cases = [(1, 2, torch.bfloat16, True), (1, 2, torch.bfloat16, False), (1, 2, torch.float32, True),
             (1, 1, torch.bfloat16, True), (2, 2, torch.bfloat16, True), (3, 2, torch.bfloat16, True)]
    for size, stride, dtype, onednn in cases:
        bad = non_finite_trials(size, stride, dtype, onednn, args.trials)
        print(f"input {size}x{size}, stride {stride}, {str(dtype).removeprefix('torch.'):8s} "
              f"oneDNN {'on ' if onednn else 'off'}: non-finite gradients in {bad} of {args.trials} trials")


if __name__ == "__main__":
    main()

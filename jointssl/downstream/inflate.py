"""Inflation of a 2D timm ResNet into a 3D network (I3D-style: Carreira & Zisserman, CVPR 2017).

The pretrained f_intra is a 2D CNN trained on axial slices. Inflating it gives a 3D network whose kernels start from
the pretrained 2D kernels, so a 3D task (nodule detection) can use the pretrained weights directly.

Rule, for every ``nn.Conv2d`` with a ``[O, I, kh, kw]`` kernel ``w`` (square, symmetric stride/padding/dilation):

* **In-plane orientation.** jointssl shows an axial slice in radiological layout (rows anterior -> posterior, columns
  patient right -> left; :mod:`jointssl.data.volume_io`). A volume in MONAI's detection pipeline is ``[C, X, Y, Z]``
  in RAS order (x: left -> right, y: posterior -> anterior, z: inferior -> superior), so row r of a slice is
  ``y = Y-1-r`` and column c is ``x = X-1-c``. The in-plane 3D kernel is therefore ``w`` rotated by 180 degrees and
  transposed: ``k[x, y] = w[kh-1-y, kw-1-x]``. With it, the inflated network sees an axial plane the way the 2D
  encoder saw the slice during pretraining (exactly so for stride-1 layers).
* **Depth.** The depth kernel size is ``kh`` (1x1 kernels stay 1 deep; 3x3 become 3x3x3; 7x7 become 7x7x7).
  ``inflation="mean"`` (I3D) repeats ``k`` along depth divided by the depth: the sum over depth is ``k``, so a volume
  that is constant along z gives the 2D responses. ``inflation="center"`` puts ``k`` at the central depth position
  and zeros elsewhere: the 3D network starts as the 2D one applied slice by slice. Either way the kernel summed over
  depth equals the reoriented 2D kernel.
* **Strides and pooling.** Depth stride, padding and dilation copy the in-plane ones, except the stem's first strided
  convolution, whose depth stride is ``stem_depth_stride`` (MONAI's LUNA16 tutorial uses ``conv1_t_stride=(2,2,1)``:
  CT slices are thicker than the in-plane pixels). ``MaxPool2d``/``AvgPool2d`` become their 3D versions the same way.
* **Normalisation.** ``BatchNorm2d`` becomes ``BatchNorm3d`` with identical affine parameters and running statistics.

Only modules whose forward is shape-agnostic are accepted besides these (ReLU-like activations, Identity, Dropout,
DropPath and the containers of plain timm ResNets: ``Sequential``, ``BasicBlock``, ``Bottleneck``). Anything else
(squeeze-excitation, blur pooling, ``Conv2dSame``, split attention, ...) raises :class:`InflationError` naming the
module, rather than producing a network that silently breaks on 5D input.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from timm.layers import DropPath
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn

from jointssl.errors import UserError

InflationRule = Literal["mean", "center"]

# Containers whose forward only chains their children (verified for timm 1.x ResNets).
_SUPPORTED_CONTAINERS = (nn.Sequential, nn.ModuleDict, BasicBlock, Bottleneck)
# Element-wise (or per-sample) modules that work on tensors of any rank.
_SHAPE_AGNOSTIC = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Identity, nn.Dropout, DropPath,
)


class InflationError(UserError, ValueError):
    """A 2D network holds a module that cannot be inflated to 3D."""


def reorient_kernel(weight: Tensor) -> Tensor:
    """Map a 2D kernel ``[..., rows, cols]`` (radiological slice layout) to ``[..., x, y]`` (RAS volume axes)."""
    return weight.flip(-2, -1).transpose(-2, -1)


def inflate_kernel(weight: Tensor, depth: int, rule: InflationRule) -> Tensor:
    """``[O, I, kh, kw]`` -> ``[O, I, kw, kh, depth]`` by the rule of the module docstring."""
    in_plane = reorient_kernel(weight)
    if rule == "mean":
        return in_plane.unsqueeze(-1).expand(*in_plane.shape, depth) / depth
    if rule == "center":
        inflated = in_plane.new_zeros(*in_plane.shape, depth)
        inflated[..., depth // 2] = in_plane
        return inflated
    raise ValueError(f"unknown inflation rule {rule!r}; use 'mean' or 'center'")


@dataclass
class _InflationState:
    rule: InflationRule
    stem_depth_stride: int
    stem_seen: bool = False  # becomes True at the first strided convolution (the stem's)


def _single(value: tuple[int, ...] | int, what: str, path: str) -> int:
    """The one value of a square/symmetric 2D setting, or an InflationError."""
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(set(values)) != 1:
        raise InflationError(f"{path}: {what} {values} is not symmetric; only square 2D kernels can be inflated")
    return int(values[0])


def _inflate_conv(conv: nn.Conv2d, state: _InflationState, path: str) -> nn.Conv3d:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise InflationError(f"{path}: padding {conv.padding!r}/{conv.padding_mode!r} is not supported")
    kernel = _single(conv.kernel_size, "kernel size", path)
    stride = _single(conv.stride, "stride", path)
    padding = _single(conv.padding, "padding", path)
    dilation = _single(conv.dilation, "dilation", path)
    depth_stride = stride
    if stride > 1 and not state.stem_seen:
        state.stem_seen = True
        depth_stride = state.stem_depth_stride
    conv3d = nn.Conv3d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=kernel,
        stride=(stride, stride, depth_stride),
        padding=padding,
        dilation=dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        conv3d.weight.copy_(inflate_kernel(conv.weight, kernel, state.rule))
        if conv.bias is not None:
            conv3d.bias.copy_(conv.bias)
    return conv3d


def _inflate_batchnorm(norm: nn.BatchNorm2d) -> nn.BatchNorm3d:
    norm3d = nn.BatchNorm3d(
        norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats,
    )
    reference = next(iter(norm.state_dict().values()), None)
    if reference is not None:
        norm3d = norm3d.to(device=reference.device)
    norm3d.load_state_dict(norm.state_dict())
    norm3d.train(norm.training)
    return norm3d


def _inflate_pool(pool: nn.MaxPool2d | nn.AvgPool2d, path: str) -> nn.Module:
    kernel = _single(pool.kernel_size, "kernel size", path)
    stride = _single(pool.stride if pool.stride is not None else pool.kernel_size, "stride", path)
    padding = _single(pool.padding, "padding", path)
    if isinstance(pool, nn.MaxPool2d):
        dilation = _single(pool.dilation, "dilation", path)
        return nn.MaxPool3d(kernel, stride, padding, dilation=dilation, ceil_mode=pool.ceil_mode)
    return nn.AvgPool3d(
        kernel, stride, padding, ceil_mode=pool.ceil_mode, count_include_pad=pool.count_include_pad,
        divisor_override=pool.divisor_override,
    )


def _inflate_leaf(module: nn.Module, state: _InflationState, path: str) -> nn.Module | None:
    """The 3D replacement of a 2D leaf, or None when ``module`` is kept (shape-agnostic or a container)."""
    if type(module) is nn.Conv2d:  # exact type: subclasses (Conv2dSame, ...) change the forward
        return _inflate_conv(module, state, path)
    if type(module) is nn.BatchNorm2d:
        return _inflate_batchnorm(module)
    if type(module) in (nn.MaxPool2d, nn.AvgPool2d):
        return _inflate_pool(module, path)
    if isinstance(module, _SHAPE_AGNOSTIC):
        return None
    if isinstance(module, _SUPPORTED_CONTAINERS):
        return None
    raise InflationError(
        f"{path}: cannot inflate {type(module).__module__}.{type(module).__name__} to 3D; only plain timm ResNets "
        "(convolutions, BatchNorm, max/avg pooling, ReLU-like activations) are supported"
    )


def _inflate_children(module: nn.Module, state: _InflationState, prefix: str) -> None:
    # Children are visited in registration order, which for timm ResNets is execution order: the first strided
    # convolution met is the stem's.
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        replacement = _inflate_leaf(child, state, path)
        if replacement is not None:
            setattr(module, name, replacement)
        else:
            _inflate_children(child, state, path)


def inflate_to_3d(model: nn.Module, rule: InflationRule = "mean", stem_depth_stride: int = 1) -> nn.Module:
    """A 3D copy of the 2D network ``model`` (left untouched), inflated by the rule of the module docstring.

    Module names are kept, so ``state_dict`` keys of the copy equal those of ``model``. Raises InflationError for
    modules that cannot be inflated.
    """
    if stem_depth_stride < 1:
        raise ValueError(f"stem_depth_stride must be >= 1, got {stem_depth_stride}")
    inflated = copy.deepcopy(model)
    state = _InflationState(rule=rule, stem_depth_stride=stem_depth_stride)
    replacement = _inflate_leaf(inflated, state, type(model).__name__)
    if replacement is not None:
        return replacement
    _inflate_children(inflated, state, "")
    return inflated


def reinitialise_convolutions(model: nn.Module) -> None:
    """Kaiming-normal (fan-out, ReLU) re-initialisation of every Conv3d, as timm initialises ResNets.

    For a randomly initialised backbone: inflating a random 2D kernel would give a depth-constant (rank-deficient)
    3D kernel; a fresh 3D initialisation does not have that bias. BatchNorm keeps timm's initialisation (including
    the zeroed last BatchNorm of every residual block).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)

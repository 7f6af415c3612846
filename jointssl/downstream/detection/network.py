"""The detection network's feature extractor: the pretrained 2D f_intra ResNet inflated to 3D
(:mod:`jointssl.downstream.inflate`) + MONAI's ``FeaturePyramidNetwork`` with an extra max-pooled level
(:class:`ResNetFPN3d`, :func:`build_feature_extractor`); MONAI's ``RetinaNet`` heads sit on it
(:class:`~jointssl.downstream.detection.module.NoduleDetector`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from torch import Tensor, nn

from jointssl.downstream.inflate import InflationRule, inflate_to_3d, reinitialise_convolutions

# Stages below this reduction are the stem (as in jointssl.models.slice_encoder).
_MIN_STAGE_REDUCTION = 4


class ResNetFPN3d(nn.Module):
    """Inflated ResNet stages + MONAI FPN: ``[B, 1, X, Y, Z]`` -> ordered dict of ``out_channels`` feature maps.

    ``body`` keeps the timm module names (``conv1``, ``bn1``, ..., ``layer2``), so ``body.<name>`` tensors
    correspond one to one to ``backbone.<name>`` tensors of the 2D slice encoder.
    """

    def __init__(self, body: nn.ModuleDict, return_names: Sequence[str], in_channels: Sequence[int],
                 out_channels: int) -> None:
        super().__init__()
        self.body = body
        self.return_names = list(return_names)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=3, in_channels_list=list(in_channels), out_channels=out_channels,
            extra_blocks=LastLevelMaxPool(3),
        )
        self.out_channels = out_channels  # RetinaNet reads this attribute

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: OrderedDict[str, Tensor] = OrderedDict()
        for name, stage in self.body.items():
            x = stage(x)
            if name in self.return_names:
                features[name] = x
        return self.fpn(features)


def _first_strided_conv_stride(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            return int(module.stride[0])
    raise ValueError("the backbone has no strided convolution")


def build_feature_extractor(
    backbone_2d: nn.Module,
    returned_layers: Sequence[int],
    fpn_channels: int,
    inflation: InflationRule,
    stem_depth_stride: int,
    reinitialise: bool,
) -> tuple[ResNetFPN3d, tuple[int, int, int]]:
    """Inflate a timm ``features_only`` ResNet (2D, left untouched) into a 3D ResNet-FPN.

    Returns the feature extractor and its ``size_divisible`` (input sizes must be multiples of it: the stride of
    the extra pooled FPN level, per axis).
    """
    info = backbone_2d.feature_info
    names, reductions, channels = info.module_name(), info.reduction(), info.channels()
    stages = [i for i, r in enumerate(reductions) if r >= _MIN_STAGE_REDUCTION]
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > len(stages):
        raise ValueError(f"returned_layers must be stage numbers in 1..{len(stages)}, got {list(returned_layers)}")
    if sorted(set(returned_layers)) != list(returned_layers):
        raise ValueError(f"returned_layers must be increasing and distinct, got {list(returned_layers)}")
    positions = [stages[k - 1] for k in returned_layers]
    return_names = [names[p] for p in positions]
    if any(name not in backbone_2d for name in return_names):
        raise ValueError(f"{type(backbone_2d).__name__}: feature stages {return_names} are not top-level modules; "
                         "a timm ResNet created with features_only=True is expected")
    inflated = inflate_to_3d(backbone_2d, inflation, stem_depth_stride)
    if reinitialise:
        reinitialise_convolutions(inflated)
    body = nn.ModuleDict()
    for name, module in inflated.items():  # timm's FeatureListNet is an ordered ModuleDict of top-level stages
        body[name] = module
        if name == return_names[-1]:
            break
    extractor = ResNetFPN3d(body, return_names, [channels[p] for p in positions], fpn_channels)
    in_plane = 2 * reductions[positions[-1]]
    first_stride = _first_strided_conv_stride(backbone_2d)
    depth = in_plane * stem_depth_stride / first_stride
    if depth != int(depth) or depth < 1:
        raise ValueError(f"stem_depth_stride {stem_depth_stride} does not divide the stem stride {first_stride}")
    return extractor, (in_plane, in_plane, int(depth))

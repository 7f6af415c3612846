"""3D augmentation: two independently augmented views of a volume, for the volume- and slice-level losses.

One call takes a volume ``[N, H, W]`` with intensities in [0, 1] (as
:func:`jointssl.data.volume_io.load_volume` returns it) and returns

* ``views``: ``Tensor[2, num_slices, 1, size, size]``, normalised with :func:`jointssl.data.intensity.to_encoder_input`;
* ``padding_mask``: ``BoolTensor[num_slices]``, True for the zero slices that pad a volume shorter than
  ``num_slices`` (always at the end).

Both views cover the SAME slab of consecutive slices: the slice-level loss pairs slice i of one view with
slice i of the other, which only means something if both show the same anatomy. For the same reason the
spatial augmentations (flips, rotation, scaling, translation, smoothing) are 3D transforms that act in-plane
only: one draw per view, applied alike to every slice, and nothing moves content from one slice index to
another. They run as MONAI 2D transforms on the slab with the slices as channels, which is that same 3D
transform at a fraction of the cost of resampling a 3D grid. The bias field varies smoothly in all three
dimensions. The views differ in everything else, each drawing its own flips, affine, bias field, gamma,
smoothing and noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    SpatialPad,
)
from monai.utils import convert_to_tensor
from torch.utils.data import get_worker_info

from jointssl.data.intensity import to_encoder_input
from jointssl.data.volume_io import resize_slices


class VolumeViews(Randomizable):
    """Random slab crop + two independently augmented views (see the module docstring).

    Args:
        num_slices: slab length N; longer volumes are cropped to a random slab, shorter ones padded at
            the end.
        size: in-plane output size; slices are zero-padded to a square (keeping the aspect ratio) and resized.
        flip_p: probability of flipping each in-plane axis (rows, columns), independently.
        affine_p: probability of an in-plane affine (rotation, scaling, translation).
        noise_p, smooth_p, bias_field_p, gamma_p: probabilities of Gaussian noise, in-plane Gaussian
            smoothing, a smooth multiplicative bias field, and a gamma change of contrast.
        rotate_degrees: rotation range (+-) of the affine.
        scale: scaling range (+-, relative) of the affine.
        translate: translation range (+-) of the affine, as a fraction of ``size``.
        noise_std: upper bound of the noise standard deviation (intensities are in [0, 1]).
        smooth_sigma: range of the smoothing sigma, in output pixels.
        bias_field_coeff: range of the bias field polynomial coefficients.
        gamma: range of the gamma exponent.
        seed: seed of the random state; None draws one from torch's global generator, so that
            ``torch.manual_seed`` / ``lightning.seed_everything`` make runs repeatable.

    In DataLoader worker processes the state is reseeded from the worker's seed (distinct per worker and per
    epoch), so that workers do not repeat each other's augmentations — unless :meth:`reseed` seeds every draw
    explicitly (as the training data loader does, per sample, so that resumed runs repeat the same views).
    """

    def __init__(
        self,
        num_slices: int = 64,
        size: int = 128,
        flip_p: float = 0.5,
        affine_p: float = 0.3,
        noise_p: float = 0.2,
        smooth_p: float = 0.2,
        bias_field_p: float = 0.2,
        gamma_p: float = 0.3,
        rotate_degrees: float = 10.0,
        scale: float = 0.1,
        translate: float = 0.05,
        noise_std: float = 0.05,
        smooth_sigma: tuple[float, float] = (0.25, 1.0),
        bias_field_coeff: tuple[float, float] = (0.0, 0.2),
        gamma: tuple[float, float] = (0.7, 1.5),
        seed: int | None = None,
    ):
        if num_slices < 1 or size < 1:
            raise ValueError(f"num_slices and size must be positive, got {num_slices} and {size}")
        self.num_slices = num_slices
        self.size = size
        # In-plane transforms (spatial ones and smoothing) see the slab as [slices, rows, cols]: MONAI
        # treats the slices as channels, so one draw applies to every slice alike.
        self.in_plane = Compose(
            [
                RandFlip(prob=flip_p, spatial_axis=0),
                RandFlip(prob=flip_p, spatial_axis=1),
                RandAffine(
                    prob=affine_p,
                    rotate_range=(math.radians(rotate_degrees),),
                    scale_range=(scale, scale),
                    translate_range=(translate * size, translate * size),
                    mode="bilinear",
                    padding_mode="zeros",
                ),
                RandGaussianSmooth(prob=smooth_p, sigma_x=smooth_sigma, sigma_y=smooth_sigma),
            ]
        )
        # Intensity transforms see it as a one-channel 3D image [1, slices, rows, cols].
        self.intensity = Compose(
            [
                RandBiasField(prob=bias_field_p, coeff_range=bias_field_coeff, degree=3),
                RandAdjustContrast(prob=gamma_p, gamma=gamma),
                RandGaussianNoise(prob=noise_p, std=noise_std),
            ]
        )
        self._worker_seed: int | None = None
        self._seeded_per_sample = False  # set by reseed(): worker seeds no longer apply
        self.set_random_state(int(torch.randint(2**31 - 1, ()).item()) if seed is None else seed)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> VolumeViews:
        """Seed the slab choice and every augmentation (for tests and reproducible runs)."""
        super().set_random_state(seed, state)
        self.in_plane.set_random_state(seed=int(self.R.randint(2**31 - 1)))
        self.intensity.set_random_state(seed=int(self.R.randint(2**31 - 1)))
        return self

    def reseed(self, seed: int) -> None:
        """Make the next draw a function of ``seed`` alone. Called before every sample by a loader that seeds each
        sample itself (:class:`~jointssl.data.sampling.SeededDataset`); from then on this copy is not reseeded
        from its DataLoader worker's seed.

        The random states are reseeded in place (``set_random_state`` builds a new RandomState for every
        transform: about 1 ms per call, against ~30 us here)."""
        self._seeded_per_sample = True
        self.R.seed(seed % 2**32)
        parts = _randomizable_parts(self)
        for part, part_seed in zip(parts, self.R.randint(0, 2**32, size=len(parts), dtype=np.int64).tolist()):
            if "R" not in vars(part):  # still Randomizable's class-wide default state: give it its own
                part.R = np.random.RandomState()
            part.R.seed(part_seed)

    def randomize(self, data: int) -> None:
        """Draw the slab start for a volume of ``data`` slices."""
        self._slab_start = int(self.R.randint(0, data - self.num_slices + 1)) if data > self.num_slices else 0

    def __call__(self, volume: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two views ``[2, num_slices, 1, size, size]`` and the padding mask ``[num_slices]`` of one
        volume."""
        self._reseed_in_worker()
        volume = torch.as_tensor(volume, dtype=torch.float32)
        if volume.ndim != 3:
            raise ValueError(f"expected a volume [N, H, W], got shape {tuple(volume.shape)}")
        self.randomize(volume.shape[0])
        slab = volume[self._slab_start : self._slab_start + self.num_slices]
        slab = self._to_square_size(slab)  # [n, size, size], shared by both views
        views = torch.stack([self._augment_one(slab) for _ in range(2)])  # [2, n, size, size]
        views = to_encoder_input(views)
        real_slices = views.shape[1]
        padding_mask = torch.zeros(self.num_slices, dtype=torch.bool, device=views.device)
        if real_slices < self.num_slices:
            # Padded after normalisation so that padded slices are exactly zero; they are masked anyway.
            views = torch.nn.functional.pad(views, (0, 0, 0, 0, 0, self.num_slices - real_slices))
            padding_mask[real_slices:] = True
        return views.unsqueeze(2).contiguous(), padding_mask

    def _to_square_size(self, slab: torch.Tensor) -> torch.Tensor:
        """Zero-pad the slices to a square, centred, then resize to size x size (no-op if already that
        size)."""
        rows, cols = slab.shape[-2:]
        if rows != cols:
            side = max(rows, cols)
            slab = convert_to_tensor(
                SpatialPad(spatial_size=(side, side), mode="constant")(slab), track_meta=False
            )
        return resize_slices(slab, self.size)

    def _augment_one(self, slab: torch.Tensor) -> torch.Tensor:
        """One view of a [slices, size, size] slab."""
        moved = convert_to_tensor(self.in_plane(slab.clone()), track_meta=False)
        augmented = convert_to_tensor(self.intensity(moved[None]), track_meta=False)[0]
        # Noise and bias field leave [0, 1]; clip so that both views keep the input's intensity range.
        return augmented.clamp_(0.0, 1.0)

    def _reseed_in_worker(self) -> None:
        """Forked DataLoader workers inherit identical copies of the random state; give each its own."""
        if self._seeded_per_sample:
            return
        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.set_random_state(info.seed % (2**31 - 1))


def _randomizable_parts(root: Randomizable) -> list[Randomizable]:
    """The Randomizable objects inside ``root`` (its transforms, theirs, ...), in a fixed order, without ``root``."""
    found: list[Randomizable] = []
    seen = {id(root)}
    pending: list[object] = list(vars(root).values())
    while pending:
        item = pending.pop(0)
        if isinstance(item, (list, tuple)):
            pending[:0] = list(item)
            continue
        if not isinstance(item, Randomizable) or id(item) in seen:
            continue
        seen.add(id(item))
        found.append(item)
        pending[:0] = list(vars(item).values())
    return found

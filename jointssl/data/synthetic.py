"""Synthetic demo data made with MONAI's generators, so that the demo and the tests run offline.

Layout under ``root``::

    root/images/<class>/<class>_<NNNN>.png       2D images
    root/volumes/<class>/<class>_<NNNN>.nii.gz   3D volumes

Four classes of images differ in shape statistics and intensity pattern (few large discs, many small discs,
heavy noise, a vertical intensity ramp). One image in eight of each class (the 2nd, 10th, ...) is stored as a
16-bit PNG holding 12-bit values, the rest as 8-bit PNG, so both decoding paths are exercised.

Four classes of volumes (MONAI's sphere generator) differ the same way; two hold CT-like values (int16
Hounsfield units: air at -1000 around soft-tissue spheres) and two MR-like values (int16, non-negative arbitrary
units, one with a smooth bias field), so that ``modality="auto"`` tells them apart. They are NIfTI files with a
RAS affine and anisotropic spacing (thicker slices than pixels, like clinical scans); ``volume_shape`` is
``(H, W, D)``: an axial slice of a loaded volume is ``H x W`` and there are ``D`` of them.

Generation is deterministic in ``seed`` and atomic: files are written to a hidden temporary folder that is
renamed to ``root/images`` (``root/volumes``) when complete, so an interrupted run never leaves a half-written
dataset and concurrent processes (one per node) cannot collide. Images and volumes are generated and checked
separately: changing only the number of images leaves the volumes alone, and vice versa.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger("jointssl.data")

IMAGE_CLASSES = ("large_discs", "small_discs", "noisy_discs", "shaded_discs")
VOLUME_CLASSES = ("ct_large_spheres", "ct_small_spheres", "mr_large_spheres", "mr_shaded_spheres")
# Hidden, so that folder discovery does not take it for an image.
COMPLETE_MARKER = ".synthetic.json"
_FORMAT_VERSION = 1
_SIXTEEN_BIT_EVERY = 8
_SIXTEEN_BIT_MAX = 4095  # 12-bit values in a 16-bit PNG, like CT/MR exports
# In-plane pixel sizes in mm; the slice spacing follows from the shape (see synthetic_volume).
_CT_PIXEL_MM = 0.8
_MR_PIXEL_MM = 1.0
_AIR_HU = -1000.0
_CT_VALUE_RANGE_HU = 1400.0  # the generator's [0, 1] maps to [-1000, 400] HU: air to contrast-enhanced tissue
_MIN_VOLUME_SIDE = 8  # in-plane: the sphere generator needs sides larger than twice the largest radius
_MIN_VOLUME_SLICES = 3  # what load_volume accepts


@dataclass
class SyntheticData:
    """Where and how much synthetic demo data to generate.

    Args:
        root: folder that receives ``images/`` and ``volumes/``.
        num_images: number of 2D images (0: none).
        image_size: side of the square images in pixels (>= 16).
        num_volumes: number of 3D volumes (0: none); half CT-like, half MR-like.
        volume_shape: ``(H, W, D)`` of every volume in voxels: ``D`` axial slices of ``H x W`` (H, W >= 8,
            D >= 3).
        seed: generator seed; the same seed gives the same files.
    """

    root: str = "demo_data"
    num_images: int = 256
    image_size: int = 64
    num_volumes: int = 0
    volume_shape: tuple[int, int, int] = (64, 64, 24)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 0 or self.num_volumes < 0:
            raise ValueError(
                f"num_images and num_volumes must be >= 0, got {self.num_images} and {self.num_volumes}"
            )
        if self.num_images == 0 and self.num_volumes == 0:
            raise ValueError("synthetic data needs num_images >= 1 or num_volumes >= 1")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        self.volume_shape = tuple(int(side) for side in self.volume_shape)  # type: ignore[assignment]
        if (
            len(self.volume_shape) != 3
            or min(self.volume_shape[:2]) < _MIN_VOLUME_SIDE
            or self.volume_shape[2] < _MIN_VOLUME_SLICES
        ):
            raise ValueError(
                f"volume_shape must be (H, W, D) with H, W >= {_MIN_VOLUME_SIDE} and D >= {_MIN_VOLUME_SLICES}, "
                f"got {self.volume_shape}"
            )

    @property
    def images_dir(self) -> Path:
        return Path(self.root) / "images"

    @property
    def volumes_dir(self) -> Path:
        return Path(self.root) / "volumes"

    def _identity(self) -> dict:
        """What determines the generated images (the root is where they are, not what they are)."""
        # The same keys as before volumes existed, so that existing image generations stay valid.
        return {
            "format_version": _FORMAT_VERSION,
            "num_images": self.num_images,
            "image_size": self.image_size,
            "seed": self.seed,
        }

    def _volume_identity(self) -> dict:
        """What determines the generated volumes."""
        return {
            "format_version": _FORMAT_VERSION,
            "num_volumes": self.num_volumes,
            "volume_shape": list(self.volume_shape),
            "seed": self.seed,
        }


def generate_synthetic_data(spec: SyntheticData) -> None:
    """Generate the images (when ``num_images > 0``) and the volumes (when ``num_volumes > 0``) of a spec."""
    if spec.num_images > 0:
        generate_synthetic_images(spec)
    if spec.num_volumes > 0:
        generate_synthetic_volumes(spec)


def synthetic_images_complete(spec: SyntheticData) -> bool:
    """True when ``root/images`` holds a finished generation with exactly this spec."""
    return _generation_complete(spec.images_dir, spec._identity())


def synthetic_volumes_complete(spec: SyntheticData) -> bool:
    """True when ``root/volumes`` holds a finished generation with exactly this spec."""
    return _generation_complete(spec.volumes_dir, spec._volume_identity())


def generate_synthetic_images(spec: SyntheticData) -> Path:
    """Write the synthetic images unless an identical generation is already there; return ``root/images``.

    A previous generation with another spec (recognised by its marker file) is replaced. A ``root/images``
    folder without the marker is someone's data and is never touched: that raises ``FileExistsError``.
    """
    target = _generate(spec.images_dir, spec._identity(), lambda folder: _write_images(folder, spec))
    logger.info("synthetic images ready: %d images of %dpx in %s", spec.num_images, spec.image_size, target)
    return target


def generate_synthetic_volumes(spec: SyntheticData) -> Path:
    """Write the synthetic volumes unless an identical generation is already there; return ``root/volumes``.

    Same rules as :func:`generate_synthetic_images`: another generation is replaced, foreign data never.
    """
    target = _generate(spec.volumes_dir, spec._volume_identity(), lambda folder: _write_volumes(folder, spec))
    logger.info(
        "synthetic volumes ready: %d volumes of %s voxels in %s", spec.num_volumes, spec.volume_shape, target
    )
    return target


def _generation_complete(target: Path, identity: dict) -> bool:
    try:
        return json.loads((target / COMPLETE_MARKER).read_text()) == identity
    except (OSError, ValueError):
        return False


def _generate(target: Path, identity: dict, write: Callable[[Path], None]) -> Path:
    """Write a generation into a staging folder with ``write`` and publish it as ``target`` (unless the same
    generation is already there)."""
    if _generation_complete(target, identity):
        return target
    if target.exists() and not (target / COMPLETE_MARKER).is_file():
        raise FileExistsError(
            f"{target} exists but was not generated by jointssl (no {COMPLETE_MARKER}); "
            "choose another synthetic root or remove the folder"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps(identity))
        _publish(staging, target, lambda: _generation_complete(target, identity))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path, is_complete: Callable[[], bool]) -> None:
    """Atomically move a finished generation into place (rename within one folder)."""
    stale: Path | None = None
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(target, stale)
        except FileNotFoundError:  # another process replaced it meanwhile
            stale = None
    try:
        os.rename(staging, target)
    except OSError:
        # Another process published first (rename onto a non-empty folder fails): fine if it is what we want.
        if not is_complete():
            raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def _disc_parameters(class_name: str, size: int) -> dict:
    """Arguments of MONAI's ``create_test_image_2d`` for one class (radii scale with the image size)."""
    if class_name == "large_discs":
        return {
            "num_objs": 3,
            "rad_max": size // 4,
            "rad_min": size // 8,
            "noise_max": 0.05,
            "num_seg_classes": 1,
        }
    if class_name == "small_discs":
        rad_min = max(1, size // 32)
        rad_max = max(rad_min + 1, size // 10)
        return {
            "num_objs": 15,
            "rad_max": rad_max,
            "rad_min": rad_min,
            "noise_max": 0.05,
            "num_seg_classes": 5,
        }
    if class_name in ("noisy_discs", "shaded_discs"):
        noise = 0.3 if class_name == "noisy_discs" else 0.05
        rad_min = max(1, size // 16)
        return {
            "num_objs": 6,
            "rad_max": size // 6,
            "rad_min": rad_min,
            "noise_max": noise,
            "num_seg_classes": 5,
        }
    raise ValueError(f"unknown synthetic image class {class_name!r}; expected one of {IMAGE_CLASSES}")


def synthetic_image(class_name: str, size: int, random_state: np.random.RandomState) -> np.ndarray:
    """One float image ``[size, size]`` in [0, 1] of the given class, from MONAI's disc generator."""
    # Imported here: importing MONAI takes seconds, and only generation needs it.
    from monai.data.synthetic import create_test_image_2d

    image, _ = create_test_image_2d(
        size, size, random_state=random_state, **_disc_parameters(class_name, size)
    )
    if class_name == "shaded_discs":  # intensity pattern: dark at the top, bright at the bottom
        image = image * np.linspace(0.25, 1.0, size)[:, None]
    return np.clip(image, 0.0, 1.0)


def _write_images(folder: Path, spec: SyntheticData) -> None:
    for class_name in IMAGE_CLASSES:
        (folder / class_name).mkdir()
    for i in range(spec.num_images):
        class_name = IMAGE_CLASSES[i % len(IMAGE_CLASSES)]
        number_in_class = i // len(IMAGE_CLASSES)
        # Seeded per image, so that each file depends only on (seed, i).
        image = synthetic_image(class_name, spec.image_size, np.random.RandomState([spec.seed, i]))
        if number_in_class % _SIXTEEN_BIT_EVERY == 1:  # early, so that small sets have 16-bit files too
            pixels = Image.fromarray(np.round(image * _SIXTEEN_BIT_MAX).astype(np.uint16))
        else:
            pixels = Image.fromarray(np.round(image * 255).astype(np.uint8))
        pixels.save(folder / class_name / f"{class_name}_{number_in_class:04d}.png")


# ----------------------------------------------------------------------------------------------------------------
# Volumes


def _sphere_parameters(class_name: str, min_side: int) -> dict:
    """Arguments of MONAI's ``create_test_image_3d`` for one class (radii scale with the smallest side)."""
    large_min = max(1, min_side // 6)
    large = {"rad_min": large_min, "rad_max": max(large_min + 1, min_side // 3)}
    small = {"rad_min": 1, "rad_max": max(2, min_side // 6)}
    medium_min = max(1, min_side // 10)
    medium = {"rad_min": medium_min, "rad_max": max(medium_min + 1, min_side // 4)}
    if class_name == "ct_large_spheres":
        return {"num_objs": 4, **large, "noise_max": 0.05, "num_seg_classes": 1}
    if class_name == "ct_small_spheres":
        return {"num_objs": 16, **small, "noise_max": 0.05, "num_seg_classes": 5}
    if class_name == "mr_large_spheres":
        return {"num_objs": 4, **large, "noise_max": 0.1, "num_seg_classes": 1}
    if class_name == "mr_shaded_spheres":
        return {"num_objs": 8, **medium, "noise_max": 0.05, "num_seg_classes": 5}
    raise ValueError(f"unknown synthetic volume class {class_name!r}; expected one of {VOLUME_CLASSES}")


def synthetic_volume(
    class_name: str, shape: tuple[int, int, int], random_state: np.random.RandomState
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One int16 volume ``[H, W, D]`` of the given class, in HU (CT classes) or MR units, and its voxel size in
    mm (x, y, z).

    The spheres are drawn on an isotropic grid at least as deep as the volume is wide and then averaged into
    ``D`` thick slices, like a clinical acquisition: the slice spacing is the pixel size times the depth
    reduction, so that the spheres stay spheres in millimetres and do not shrink with ``D``.
    """
    from monai.data.synthetic import create_test_image_3d  # slow import, only needed here

    height, width, depth = shape
    fine_depth = max(min(height, width), depth)
    image, _ = create_test_image_3d(
        height,
        width,
        fine_depth,
        random_state=random_state,
        **_sphere_parameters(class_name, min(height, width)),
    )  # float in [0, 1]: background 0 plus noise
    # Partial-volume averaging of the fine slices into `depth` thick ones.
    fine = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).reshape(
        height * width, 1, fine_depth
    )
    image = torch.nn.functional.adaptive_avg_pool1d(fine, depth).reshape(height, width, depth).numpy()
    if class_name.startswith("ct_"):
        values = _AIR_HU + image * _CT_VALUE_RANGE_HU
        pixel_mm = _CT_PIXEL_MM
    else:
        # MR scales differ between scanners: draw the brightest value per volume.
        values = image * random_state.uniform(800.0, 2000.0)
        if class_name == "mr_shaded_spheres":  # a smooth bias field: dark on one side, bright on the other
            values = values * np.linspace(0.4, 1.0, width)[None, :, None]
        pixel_mm = _MR_PIXEL_MM
    spacing = (pixel_mm, pixel_mm, round(pixel_mm * fine_depth / depth, 4))
    return np.round(values).astype(np.int16), spacing


def _write_volumes(folder: Path, spec: SyntheticData) -> None:
    import nibabel as nib  # only generation needs it

    for class_name in VOLUME_CLASSES:
        (folder / class_name).mkdir()
    for i in range(spec.num_volumes):
        class_name = VOLUME_CLASSES[i % len(VOLUME_CLASSES)]
        number_in_class = i // len(VOLUME_CLASSES)
        # Seeded per volume and apart from the images' seeds ([seed, i]), so that each file depends on (seed, i).
        volume, spacing = synthetic_volume(
            class_name, spec.volume_shape, np.random.RandomState([spec.seed, i, 3])
        )
        # NIfTI arrays are (x, y, z) = (columns, rows, slices) in RAS: store [W, H, D], so that an axial slice of
        # the loaded volume is H x W.
        nifti = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(1, 0, 2)), np.diag([*spacing, 1.0]))
        nifti.header.set_xyzt_units("mm")
        nib.save(nifti, str(folder / class_name / f"{class_name}_{number_in_class:04d}.nii.gz"))

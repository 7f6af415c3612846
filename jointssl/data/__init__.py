"""Data loading for jointssl: sources, decoding, augmentation, datasets and the JointDataModule."""

from jointssl.data.datamodule import JointDataModule
from jointssl.data.datasets import ImageDataset, MultiCropDataset, collate_multicrop
from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.image_io import MIN_IMAGE_SIDE, load_image_2d
from jointssl.data.discovery import ImageRecord, discover_images, discover_volumes
from jointssl.data.synthetic import (
    SyntheticData,
    generate_synthetic_data,
    generate_synthetic_images,
    generate_synthetic_volumes,
)
from jointssl.data.transforms import MultiCropTransform
from jointssl.data.volume_datasets import CachedVolumes, SliceDataset, VolumeDataset, collate_volumes
from jointssl.data.validation import FileCheck, OnBadFile, check_images, check_volumes, validate_images, validate_volumes
from jointssl.data.volume_io import VolumeRecord, load_volume
from jointssl.data.volume_transforms import VolumeViews

__all__ = [
    "MIN_IMAGE_SIDE",
    "BadFileError",
    "CachedVolumes",
    "DataValidationError",
    "FileCheck",
    "ImageDataset",
    "ImageRecord",
    "JointDataModule",
    "MultiCropDataset",
    "MultiCropTransform",
    "OnBadFile",
    "SliceDataset",
    "SyntheticData",
    "VolumeDataset",
    "VolumeRecord",
    "VolumeViews",
    "check_images",
    "check_volumes",
    "collate_multicrop",
    "collate_volumes",
    "discover_images",
    "discover_volumes",
    "generate_synthetic_data",
    "generate_synthetic_images",
    "generate_synthetic_volumes",
    "load_image_2d",
    "load_volume",
    "validate_images",
    "validate_volumes",
]

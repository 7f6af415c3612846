"""Data loading for jointssl: sources, decoding, augmentation, datasets and the JointDataModule."""

from jointssl.data.datamodule import JointDataModule
from jointssl.data.datasets import ImageDataset, collate_multicrop
from jointssl.data.errors import BadFileError, DataValidationError
from jointssl.data.image_io import MIN_IMAGE_SIDE, load_image_2d
from jointssl.data.sources import ImageRecord, discover_images, validate_images
from jointssl.data.synthetic import SyntheticData, generate_synthetic_images
from jointssl.data.transforms import MultiCropTransform

__all__ = [
    "MIN_IMAGE_SIDE",
    "BadFileError",
    "DataValidationError",
    "ImageDataset",
    "ImageRecord",
    "JointDataModule",
    "MultiCropTransform",
    "SyntheticData",
    "collate_multicrop",
    "discover_images",
    "generate_synthetic_images",
    "load_image_2d",
    "validate_images",
]

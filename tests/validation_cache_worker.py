"""One rank of tests/test_validation.py's DDP cache test: JointDataModule.setup validates this rank's shard of
``<out>/images`` through the validation cache in ``<out>/cache`` twice (a start and a restart), counting the images
each start decodes on this rank.

Usage: python -m tests.validation_cache_worker --rank R --world-size 2 --port P --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from jointssl.data import JointDataModule, validation
from tests.bad_inputs import SETTINGS
from tests.gloo_ranks import worker_main


def compute(rank: int, world_size: int) -> dict:
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    decoded: list[str] = []
    decode = validation.decode_image_2d
    validation.decode_image_2d = lambda path: decoded.append(path) or decode(path)
    counts = []
    for _ in range(2):
        datamodule = JointDataModule(
            images=[str(out / "images")], cache_dir=str(out / "cache"), batch_size=2, num_workers=0,
            persistent_workers=False, **SETTINGS,
        )
        datamodule.setup("fit")
        counts.append(len(decoded))
        decoded.clear()
    return {"first": counts[0], "second": counts[1], "records": len(datamodule.image_records)}


if __name__ == "__main__":
    worker_main(compute)

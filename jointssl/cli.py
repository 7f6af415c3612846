"""`jointssl` command line: a LightningCLI, so every constructor argument of the model, the data module and the
Trainer is a config key (`jointssl fit --print_config` shows them all).

    jointssl fit --config configs/demo.yaml
    jointssl fit --config configs/pretrain/swav_2d.yaml --data.init_args.images='[/data/cxr]'
"""

from __future__ import annotations

import logging

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that the short class names in configs resolve and `--help` lists them.
import jointssl.data  # noqa: F401
import jointssl.pretrain  # noqa: F401

log = logging.getLogger("jointssl")


class JointSSLCLI(LightningCLI):
    def after_fit(self) -> None:
        # Researchers need to know where the weights went without digging through the log directory.
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None:
            path = checkpoint.last_model_path or checkpoint.best_model_path
            if path:
                print(f"jointssl: checkpoint written to {path}", flush=True)


def main(args: ArgsType = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # MONAI announces on import that an optional GPU DICOM decoder is missing; jointssl does not use it.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    JointSSLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A second run in the same directory must not fail on an existing config.yaml.
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()

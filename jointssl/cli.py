"""`jointssl` command line: a LightningCLI, so every constructor argument of the model, the data module and the
Trainer is a config key (`jointssl fit --print_config` shows them all).

    jointssl fit --config configs/demo.yaml
    jointssl fit --config configs/pretrain/swav_2d.yaml --data.init_args.images='[/data/cxr]'

Helper commands beside LightningCLI's fit/validate/test/predict are dispatched in `main` before LightningCLI
parses anything (they take no model, data or trainer configuration):

    jointssl export --checkpoint runs/demo/checkpoints/last.ckpt --output exported/
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported so that the short class names in configs resolve and `--help` lists them.
import jointssl.data
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


def export_command(argv: Sequence[str]) -> None:
    """`jointssl export`: write a pretraining checkpoint's encoders as safetensors (see jointssl.downstream.export)."""
    from jointssl.downstream.export import BACKBONE_WEIGHTS, ExportError, export_pretrained
    from jointssl.downstream.pretrained import EXPORT_CONFIG, EXPORT_WEIGHTS, PretrainedLoadError

    parser = argparse.ArgumentParser(
        prog="jointssl export",
        description=(
            f"Export the encoders of a jointssl pretraining checkpoint: {EXPORT_WEIGHTS} (f_intra + f_inter, for "
            f"jointssl downstream modules: pretrained=OUTPUT), {BACKBONE_WEIGHTS} (the timm backbone under timm's "
            f"own names, loadable with timm alone) and {EXPORT_CONFIG}. Only tensors are read from the checkpoint."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="pretraining .ckpt (or an earlier export folder)")
    parser.add_argument("--output", required=True, help="folder to write the export into (created if needed)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing export")
    options = parser.parse_args(list(argv))
    try:
        files = export_pretrained(options.checkpoint, options.output, overwrite=options.overwrite)
    except (PretrainedLoadError, ExportError) as error:
        parser.exit(2, f"jointssl export: error: {error}\n")
    print(f"jointssl: exported {files.encoders}, {files.backbone} and {files.config}", flush=True)


#: Helper commands: name -> (one-line help, handler taking the remaining arguments).
HELPER_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], None]]] = {
    "export": ("Export pretrained encoders (safetensors + config.json) for downstream use.", export_command),
}


def _helper_epilog() -> str:
    lines = [f"{name}: {text}" for name, (text, _) in HELPER_COMMANDS.items()]
    return "other commands (jointssl COMMAND --help): " + "; ".join(lines)


def main(args: ArgsType = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # MONAI announces on import that an optional GPU DICOM decoder is missing; jointssl does not use it.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] in HELPER_COMMANDS:
        HELPER_COMMANDS[argv[0]][1](argv[1:])
        return
    JointSSLCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # A second run in the same directory must not fail on an existing config.yaml.
        save_config_kwargs={"overwrite": True},
        # `jointssl --help` lists the helper commands too (LightningCLI only knows the Trainer's).
        parser_kwargs={"epilog": _helper_epilog()},
        args=args,
    )


if __name__ == "__main__":
    main()

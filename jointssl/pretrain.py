"""JointSSL: the pretraining LightningModule. It wires the volume encoder (f_intra + f_inter,
`jointssl.models.VolumeEncoder`), the two clustering objectives (`jointssl.objectives`) and the mask decoder into
the three losses; its callbacks (configure_callbacks) guard the numerics and monitor collapse
(`jointssl.callbacks`). Each part is tested on its own.

One step (docs/method.md): every 2D crop and every real slice of both volume views goes through f_intra in one
batched pass per resolution; L_intra on the 2D crops and on paired slices of the two views; f_inter aggregates
each view's slices into a volume feature for L_inter; L_mask predicts masked slice embeddings from the rest.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor

from jointssl import diagnostics, distributed
from jointssl.callbacks.collapse_monitor import CollapseMonitor
from jointssl.callbacks.numerics_guard import NumericsGuard
from jointssl.callbacks.prediction_writers import EmbeddingWriter
from jointssl.callbacks.resume import ExactResume
from jointssl.checkpointing import AtomicCheckpoints
from jointssl.errors import ConfigError, check_ranges
from jointssl.losses import (
    interpolate_masked_slices,
    keyed_uniform,
    masked_embedding_loss,
    random_slice_mask,
    visible_slices,
)
from jointssl.models import AggregatorConfig, MaskDecoder, VolumeEncoder
from jointssl.models.aggregator import standardise_slices
from jointssl.objectives import build_objective
from jointssl.optim import lars, upgrade_single_group_lars, warmup_cosine_scheduler

log = logging.getLogger("jointssl")

CHECKPOINT_FORMAT_VERSION = 1
#: Parts that `freeze` may name.
PARTS = ("encoder", "intra", "aggregator", "inter", "mask_decoder")
#: Checkpoint key of the state each rank holds for itself (queues, memory banks, usage counts), one entry per rank.
RANK_STATE_KEY = "jointssl_rank_state"
# Salts of the per-sample random choices (see `keyed_uniform`): one stream per purpose.
_PICK_SLICES, _MASK_SLICES = 0, 1


class JointSSL(LightningModule):
    """Joint 2D + 3D self-supervised pretraining (intra-inter contrastive clustering).

    L = intra_weight * L_intra + inter_weight * L_inter + mask_weight * L_mask. A weight of 0 switches a loss off
    (it is not computed); together with `freeze` this gives the staged recipe of the authors' code and the plain 2D
    baselines (see configs/pretrain/).

    Args:
        backbone: timm model name of the 2D slice encoder (`in_chans=1`, no pretrained weights are downloaded).
        d_model: width of the multi-scale slice embedding (and of the aggregator tokens).
        method: "swav" (Sinkhorn swapped assignment) or "deepcluster" (k-means pseudo-labels, DeepCluster-v2), for
            both L_intra and L_inter.
        projection_hidden_dim: hidden width of the projection MLPs (0: a single linear layer).
        projection_dim: output width of the projection MLPs (the space the prototypes live in).
        num_prototypes: 2D prototypes per head. SwAV uses exactly one head; DeepCluster-v2 one k-means per head.
        num_prototypes_3d: 3D (volume) prototypes per head, for L_inter.
        temperature: softmax temperature of the prototype scores.
        sinkhorn_epsilon: entropic regularisation of Sinkhorn-Knopp (SwAV).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (SwAV).
        queue_length: SwAV queue of past 2D embeddings per assigned crop (0: none), in total over all ranks: each
            rank keeps queue_length / world_size rows (as the reference), so a config means the same on any number
            of devices. Helps small batches.
        queue_length_3d: SwAV queue of past volume embeddings (volume batches are small: keep one); also a total.
        queue_start_epoch: the epoch from which the queues are used for computing codes.
        freeze_prototypes_steps: SwAV prototypes receive no update during the first steps (stabilises start).
        kmeans_iterations: spherical k-means iterations per epoch (DeepCluster-v2).
        intra_weight: weight of L_intra (2D crops + paired volume slices).
        inter_weight: weight of L_inter (3D cluster agreement of the two volume views).
        mask_weight: weight of L_mask (masked slice-embedding prediction).
        intra_slices_per_volume: slices per volume (same positions in both views) that enter L_intra.
        mask_ratio: fraction of a volume's real slices replaced by the mask token for L_mask.
        mask_span: masked slices come in contiguous spans of this many slices (1: independent slices, which
            interpolating the two neighbours already predicts well; see `random_slice_mask`).
        aggregator_layers: f_inter transformer layers.
        aggregator_heads: f_inter attention heads.
        aggregator_ffn_dim: f_inter feed-forward width.
        aggregator_dropout: f_inter dropout.
        deformable_downsample: one deformable reference point per this many slices.
        deformable_offset_scale: bound of the learned offsets (in reference spacings, see DeformableSliceAttention).
        deformable_max_points: most deformable keys per query, so that f_inter's cost stays linear in the slices
            (None: one per ``deformable_downsample`` slices, quadratic); 64 changes nothing up to 256 slices.
        aggregator_input_norm: "volume": f_inter's tokens are per-volume standardised slice embeddings plus a
            batch-normalised volume context, and L_mask predicts the standardised embeddings (so predicting the
            visible slices' mean scores L_mask = 1 x their spread); "none": raw slice embeddings in and as targets
            (the paper's aggregator). See jointssl.models.aggregator.
        freeze: parts that are not trained, from "encoder", "intra", "aggregator", "inter", "mask_decoder".
            Frozen parts run in eval mode (no BatchNorm statistics updates).
        init_from: a jointssl checkpoint whose weights initialise this model (the previous stage of a staged
            recipe). Loaded with `weights_only=True`; missing/unexpected keys are logged.
        slice_chunk_size: run f_intra over at most this many slices/crops at a time (0: all at once).
        checkpoint_slices: recompute f_intra activations in the backward pass (per chunk) to fit 64-slice volumes.
        channels_last: f_intra's CNN in NHWC memory format (weights and inputs), the layout of tensor-core
            convolutions on GPUs; the state_dict is unchanged (SliceEncoder).
        compile_encoder: torch.compile f_intra's CNN in place (inductor, dynamic shapes; the first steps compile);
            state_dict keys unchanged (SliceEncoder.enable_compile).
        base_lr: learning rate for `lr_reference_batch_size` samples; the actual rate scales linearly with the
            global batch size (per-device 2D batch x devices x nodes x gradient accumulation).
        lr_reference_batch_size: the batch size `base_lr` is quoted for.
        min_lr_ratio: final learning rate of the cosine schedule, as a fraction of the peak.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        weight_decay: applied to weights only (no bias / norm parameters), as in the reference.
        momentum: SGD momentum.
        lars_trust_coefficient: LARS trust coefficient (eta); 0 disables the LARS adaptation (plain SGD).
        max_consecutive_bad_steps: a step whose loss (any term, on any rank) or gradient is not finite is skipped
            (no weight or momentum update, though it counts towards ``max_steps`` and the learning-rate schedule;
            counted in ``train/skipped_steps``); this many skipped
            steps in a row stop the run with `NonFiniteTrainingError` naming the loss term and the batch's samples.
            With fp16 mixed precision, non-finite gradients are left to the gradient scaler (they are expected
            while it finds its scale); non-finite losses are still skipped.
        collapse_min_prototypes_used: collapse alarm: a warning when, over an epoch, the fraction of head-0
            prototypes that won at least one assignment falls below this (``train/*_prototypes_used``).
        collapse_min_entropy: collapse alarm: a warning when the normalised entropy of the epoch's assignment
            histogram falls below this (``train/*_assignment_entropy``; 1 = uniform, 0 = one cluster).
        collapse_min_effective_rank: collapse alarm: a warning when the effective rank of f_intra's embeddings of a
            batch, last measured in the epoch (``train/intra_effective_rank``), falls below this.

    Diagnostics, logged at the logging interval only (nothing is computed on other steps), each against what a
    predictor that learned nothing gets (jointssl.diagnostics): ``train/{intra,inter}_loss_over_chance`` (loss /
    ln K: 1 = chance), ``train/{intra,inter}_prediction_entropy`` and, for SwAV, ``..._code_entropy`` (over ln K),
    ``train/mask_r2_vs_mean`` and ``train/mask_r2_vs_neighbours`` (R^2 of the masked-slice predictions against the
    visible slices' mean and against interpolating the nearest visible neighbours, which L_mask's prediction starts
    from: > 0 beats them), and
    ``train/{intra,inter}_effective_rank`` and ``train/intra_embedding_norm`` (collapse and shrinkage).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        d_model: int = 640,
        method: Literal["swav", "deepcluster"] = "swav",
        projection_hidden_dim: int = 2048,
        projection_dim: int = 128,
        num_prototypes: list[int] = [3000],  # noqa: B006 - jsonargparse needs a literal default for the schema
        num_prototypes_3d: list[int] = [300],  # noqa: B006
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_length_3d: int = 0,
        queue_start_epoch: int = 15,
        freeze_prototypes_steps: int = 313,
        kmeans_iterations: int = 10,
        intra_weight: float = 1.0,
        inter_weight: float = 1.0,
        mask_weight: float = 1.0,
        intra_slices_per_volume: int = 8,
        mask_ratio: float = 0.3,
        mask_span: int = 4,
        aggregator_layers: int = 4,
        aggregator_heads: int = 8,
        aggregator_ffn_dim: int = 720,
        aggregator_dropout: float = 0.1,
        deformable_downsample: int = 4,
        deformable_offset_scale: float = 2.0,
        deformable_max_points: int | None = 64,
        aggregator_input_norm: Literal["volume", "none"] = "volume",
        freeze: list[str] = [],  # noqa: B006
        init_from: str | None = None,
        slice_chunk_size: int = 0,
        checkpoint_slices: bool = False,
        channels_last: bool = False,
        compile_encoder: bool = False,
        base_lr: float = 0.6,
        lr_reference_batch_size: int = 256,
        min_lr_ratio: float = 0.001,
        warmup_epochs: float = 10.0,
        weight_decay: float = 1e-6,
        momentum: float = 0.9,
        lars_trust_coefficient: float = 1e-3,
        max_consecutive_bad_steps: int = 10,
        collapse_min_prototypes_used: float = 0.1,
        collapse_min_entropy: float = 0.3,
        collapse_min_effective_rank: float = 1.5,
    ) -> None:
        super().__init__()
        unknown = set(freeze) - set(PARTS)
        if unknown:
            raise ConfigError(f"JointSSL: freeze: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
        if min(intra_weight, inter_weight, mask_weight) < 0 or intra_weight + inter_weight + mask_weight == 0:
            raise ConfigError("JointSSL: loss weights must be >= 0 and not all 0")
        # Every range before any file is decoded, naming the option (a user error: one line from the CLI).
        check_ranges(
            "JointSSL", locals(),
            positive=("d_model", "projection_dim", "num_prototypes", "num_prototypes_3d", "temperature",
                      "sinkhorn_epsilon", "sinkhorn_iterations", "kmeans_iterations", "intra_slices_per_volume",
                      "mask_span", "aggregator_layers", "aggregator_heads", "aggregator_ffn_dim",
                      "deformable_downsample", "deformable_max_points", "base_lr", "lr_reference_batch_size",
                      "max_consecutive_bad_steps"),
            non_negative=("projection_hidden_dim", "queue_length", "queue_length_3d", "queue_start_epoch",
                          "freeze_prototypes_steps", "deformable_offset_scale", "slice_chunk_size", "warmup_epochs",
                          "weight_decay", "momentum", "lars_trust_coefficient"),
            unit_interval=("mask_ratio", "aggregator_dropout", "min_lr_ratio"),
        )
        self.save_hyperparameters()
        task = dict(
            method=method, in_dim=d_model, hidden_dim=projection_hidden_dim, out_dim=projection_dim,
            temperature=temperature, sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_iterations=sinkhorn_iterations,
            kmeans_iterations=kmeans_iterations,
        )
        volume_encoder = VolumeEncoder.build(
            backbone, d_model, AggregatorConfig.from_pretrain_hparams(self.hparams),
            slice_chunk_size=slice_chunk_size, checkpoint_slices=checkpoint_slices,
            channels_last=channels_last, compile_encoder=compile_encoder,
        )
        # f_intra and f_inter are registered here, as `encoder` and `aggregator` (the checkpoint keys that
        # exports, downstream loading and resumes read); the VolumeEncoder composing them is held outside the
        # module tree, so that its parameters are not a second time in the state_dict.
        self.encoder = volume_encoder.encoder
        self.intra = build_objective(num_prototypes=num_prototypes, queue_length=queue_length, **task)
        self.aggregator = volume_encoder.aggregator
        object.__setattr__(self, "volume_encoder", volume_encoder)
        self.inter = build_objective(num_prototypes=num_prototypes_3d, queue_length=queue_length_3d, **task)
        self.mask_decoder = MaskDecoder(d_model)
        # Prototype-usage monitors: how often each head-0 prototype won an assignment in the current epoch.
        self.register_buffer("intra_counts", torch.zeros(num_prototypes[0], dtype=torch.long), persistent=False)
        self.register_buffer("inter_counts", torch.zeros(num_prototypes_3d[0], dtype=torch.long), persistent=False)
        if init_from:
            self._init_from_checkpoint(init_from)
        self._frozen: set[str] = set(freeze)
        self._apply_freeze()
        self._sample_seed = 0  # set from torch's seed in setup
        # The module's own callbacks (configure_callbacks), configured from its hyper-parameters; training_step
        # asks the guard whether a step's loss must be skipped.
        self.numerics_guard = NumericsGuard(max_consecutive_bad_steps)
        self.collapse_monitor = CollapseMonitor(
            collapse_min_prototypes_used, collapse_min_entropy, collapse_min_effective_rank
        )

    # ------------------------------------------------------------------ set-up
    def _init_from_checkpoint(self, path: str) -> None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        # Queues and memory banks belong to the previous stage's run, not to the weights being handed on.
        state = {k: v for k, v in state.items() if ".memory." not in k and "queue" not in k}
        result = self.load_state_dict(state, strict=False)
        log.info(
            "initialised from %s: %d tensors; missing %s; unexpected %s",
            path, len(state), result.missing_keys or "none", result.unexpected_keys or "none",
        )

    def _apply_freeze(self) -> None:
        for name in self._frozen:
            module = getattr(self, name)
            module.requires_grad_(False)
            # Lightning never calls `model.train()` (it keeps each module's mode), so set eval mode here too.
            module.eval()

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        # Per-sample choices (slice pairs, masks) are keyed by this seed: seed_everything gives every rank the same.
        self._sample_seed = torch.initial_seed()
        data = self.trainer.datamodule
        has_volumes = getattr(data, "num_volumes", 0) > 0
        # Parts no active loss uses must not require gradients: DDP would wait for their gradients forever.
        unused = set()
        if self.hparams.intra_weight == 0:
            unused.add("intra")
        if self.hparams.inter_weight == 0 or not has_volumes:
            unused.add("inter")
        if self.hparams.mask_weight == 0 or not has_volumes:
            unused.add("mask_decoder")
        if {"inter", "mask_decoder"} <= unused:
            unused.add("aggregator")
        elif "mask_decoder" in unused:
            self.aggregator.mask_token.requires_grad_(False)
        if unused - self._frozen:
            log.info("not trained (no active loss uses them): %s", ", ".join(sorted(unused - self._frozen)))
        self._frozen |= unused
        self._apply_freeze()
        if self.hparams.projection_hidden_dim > 0:
            # The projection heads' BatchNorm needs two samples per device batch to compute training statistics.
            batches = [("batch_size", data.batch_size, "intra")]
            if has_volumes:
                batches.append(("volume_batch_size", data.volume_batch_size, "inter"))
            for name, size, task in batches:
                if task not in self._frozen and size < 2:
                    raise ConfigError(
                        f"{name}={size}: the projection head's BatchNorm needs at least 2 samples per device batch"
                    )
        world = self.trainer.world_size
        num_volumes = getattr(data, "num_volumes", 0)
        if self.hparams.method == "deepcluster":
            # k-means needs at least as many embeddings as clusters: say so now, not at the first epoch start.
            checks = [("2D samples", data.num_samples - num_volumes, self.hparams.num_prototypes, "intra")]
            checks.append(("volumes", num_volumes, self.hparams.num_prototypes_3d, "inter"))
            for what, count, prototypes, task in checks:
                if task not in self._frozen and count < max(prototypes):
                    raise ConfigError(
                        f"DeepCluster-v2 needs at least as many {what} as prototypes per head: {count} < "
                        f"{max(prototypes)}; lower num_prototypes{'_3d' if task == 'inter' else ''} or add data"
                    )
        self.intra.prepare(data.num_samples, data.num_samples - num_volumes, world)
        self.inter.prepare(data.num_samples, num_volumes, world)
        # Queues, memory banks and usage counts are each rank's own: DDP must not overwrite them with rank 0's
        # copy at every forward (its default `broadcast_buffers`), which it would otherwise do to every buffer.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, self.per_rank_buffer_names()
        )

    def per_rank_buffer_names(self) -> list[str]:
        """Buffers whose content differs between ranks by design: SwAV queues (each rank queues its own
        embeddings), DeepCluster-v2 memory banks (each rank's shard) and the prototype-usage counts."""
        names = ["intra_counts", "inter_counts"]
        for task in ("intra", "inter"):
            objective = getattr(self, task)
            owners = {id(module) for module in objective.per_rank_modules()}
            for owner, module in objective.named_modules():
                if id(module) in owners:
                    names.extend(f"{task}.{owner}.{name}" for name, _ in module.named_buffers())
        return names

    def configure_callbacks(self) -> list[Callback]:
        # Part of the module, not of a config: without them a killed run cannot resume exactly (each rank's RNG
        # state, the loaders' positions) and a kill during a save could corrupt last.ckpt.
        # The guard and the monitor are the module's too: they are configured by its hyper-parameters. `jointssl
        # predict` writes embeddings and assignments unless the config has its own EmbeddingWriter (a returned
        # callback would replace the configured one, and its output_dir).
        callbacks: list[Callback] = [ExactResume(), AtomicCheckpoints(), self.numerics_guard, self.collapse_monitor]
        if not any(isinstance(callback, EmbeddingWriter) for callback in self.trainer.callbacks):
            callbacks.append(EmbeddingWriter())
        return callbacks

    def train(self, mode: bool = True) -> JointSSL:
        super().train(mode)
        # Frozen parts stay in eval mode: their BatchNorm statistics must not drift either.
        for name in getattr(self, "_frozen", ()):
            getattr(self, name).eval()
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self.hparams.base_lr * self.global_batch_size() / self.hparams.lr_reference_batch_size
        log.info(
            "learning rate %.4g = base_lr %.4g x global batch %d / %d",
            lr, self.hparams.base_lr, self.global_batch_size(), self.hparams.lr_reference_batch_size,
        )
        optimizer = lars(
            self.parameters(),
            lr=lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
            trust_coefficient=self.hparams.lars_trust_coefficient,
        )
        scheduler = warmup_cosine_scheduler(
            optimizer, self.trainer, self.hparams.warmup_epochs, self.hparams.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def global_batch_size(self) -> int:
        """2D samples per optimizer step over all devices (volumes count through their slices in L_intra; the
        linear scaling rule follows the 2D batch, as in the reference SwAV/DeepCluster recipes)."""
        trainer = self.trainer
        per_device = trainer.datamodule.batch_size
        return per_device * trainer.world_size * trainer.accumulate_grad_batches

    # ------------------------------------------------------------------ forward
    def _use_queue(self, length: int) -> bool:
        return length > 0 and self.current_epoch >= self.hparams.queue_start_epoch

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Every active loss of one batch (weighted sum under "loss"), the assignment tensors for monitoring, and
        under "diagnostics" the detached tensors the diagnostics are computed from (on logging steps only)."""
        hp = self.hparams
        images = batch.get("images")
        volumes = batch.get("volumes")
        inputs: list[Tensor] = []
        if images is not None and hp.intra_weight > 0:
            inputs.extend(images["crops"])
        real = None
        if volumes is not None:
            views, padding = volumes["views"], volumes["padding_mask"]  # [B,2,N,1,S,S], [B,N]
            real = ~padding
            # Only real slices go through the CNN; the two views share one slab, so one mask serves both. The 2D
            # crops and the slices of both views go through f_intra together (one BatchNorm batch per resolution).
            inputs.append(VolumeEncoder.real_slices(views[:, 0], padding))
            inputs.append(VolumeEncoder.real_slices(views[:, 1], padding))
        volume_encoder = self.volume_encoder
        features = volume_encoder.encode(inputs)
        out: dict[str, Any] = {}
        diagnostic_inputs: dict[str, Any] = {}
        intra_parts: list[tuple[Tensor, int | Tensor]] = []
        if images is not None and hp.intra_weight > 0:
            n = len(images["crops"])
            embeddings = [self.intra.project(f) for f in features[:n]]
            result = self.intra.multicrop_loss(embeddings, images["index"], self._use_queue(hp.queue_length))
            intra_parts.append((result.loss, images["index"].shape[0]))
            out["intra_assignments"] = result.assignments
            diagnostic_inputs.update(intra=result, intra_features=features[0].detach())
            features = features[n:]
        if volumes is not None:
            slices_s, slices_t = features
            batch_size, num_slices = real.shape
            # The collated host ints (no device sync); a hand-built batch may have only the index tensor.
            keys = volumes.get("keys", volumes["index"])
            z_s = volume_encoder.scatter(slices_s, padding, real.shape)
            z_t = volume_encoder.scatter(slices_t, padding, real.shape)
            if hp.intra_weight > 0:
                pick = self._pick_slices(real, hp.intra_slices_per_volume, keys)
                pair = self.intra.pair_loss(
                    self.intra.project(z_s[pick]), self.intra.project(z_t[pick]), self._use_queue(hp.queue_length)
                )
                intra_parts.append((pair.loss, pick.sum()))  # a tensor: no host sync
                diagnostic_inputs.setdefault("intra", pair)
                diagnostic_inputs.setdefault("intra_features", slices_s.detach())
            if hp.inter_weight > 0:
                volume_s = volume_encoder.pool(volume_encoder.aggregate(z_s, padding), padding)
                volume_t = volume_encoder.pool(volume_encoder.aggregate(z_t, padding), padding)
                embeddings = [self.inter.project(volume_s), self.inter.project(volume_t)]
                result = self.inter.multicrop_loss(embeddings, volumes["index"], self._use_queue(hp.queue_length_3d))
                out["inter"] = result.loss
                out["inter_assignments"] = result.assignments
                diagnostic_inputs.update(inter=result, inter_features=torch.cat([volume_s, volume_t]).detach())
            if hp.mask_weight > 0:
                draws = keyed_uniform(
                    keys, num_slices, salt=self._sample_salt(_MASK_SLICES), device=padding.device
                )
                mask = random_slice_mask(
                    padding, num_slices, batch_size, ratio=hp.mask_ratio, uniform=draws, span=hp.mask_span
                )
                tokens = volume_encoder.aggregate(z_s, padding, mask)
                target = z_s
                if hp.aggregator_input_norm == "volume":
                    target = standardise_slices(z_s, visible_slices(mask, padding))
                # f_inter + decoder predict what interpolating the visible neighbours misses (losses/masked.py).
                predicted = interpolate_masked_slices(target, mask, padding) + self.mask_decoder(tokens)
                out["mask"] = masked_embedding_loss(predicted, target, mask)
                diagnostic_inputs["mask"] = (predicted.detach(), target.detach(), mask, padding)
        if intra_parts:
            # Images and slice pairs weighted by their number of samples.
            total = sum(count for _, count in intra_parts)
            out["intra"] = sum(loss * (count / total) for loss, count in intra_parts)
        out["loss"] = sum(hp[f"{name}_weight"] * out[name] for name in ("intra", "inter", "mask") if name in out)
        out["diagnostics"] = diagnostic_inputs
        return out

    def _sample_salt(self, purpose: int) -> tuple[int, int, int]:
        return (self._sample_seed, self.global_step, purpose)

    def _pick_slices(self, real: Tensor, per_volume: int, keys: list[int] | Tensor) -> Tensor:
        """A random subset of at most `per_volume` real slices of each volume (bool [B, N]), drawn per volume
        from (seed, step, volume index `keys`): the same whether a batch is split between ranks or resumed."""
        scores = keyed_uniform(keys, real.shape[1], salt=self._sample_salt(_PICK_SLICES), device=real.device)
        scores = scores.masked_fill(~real, -1.0)
        k = min(per_volume, real.shape[1])
        top = scores.topk(k, dim=1).indices
        pick = torch.zeros_like(real)
        pick.scatter_(1, top, True)
        return pick & real

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        # Only the banks of active losses (a DeepCluster-v2 mask-only stage would otherwise read a whole epoch of
        # data for nothing).
        intra_needs = self.hparams.intra_weight > 0 and self.intra.needs_memory()
        inter_needs = self.hparams.inter_weight > 0 and self.inter.needs_memory()
        if intra_needs or inter_needs:
            self._fill_memory_banks()

    @torch.no_grad()
    def _fill_memory_banks(self) -> None:
        """DeepCluster-v2 clusters at every epoch start, so the banks must hold embeddings before the first epoch:
        one pass over the (augmented) training data, as the reference's init_memory."""
        was_training = self.training
        self.eval()
        # The trainer's loaders, not fresh ones: under DDP they carry the distributed sampler, so each rank
        # fills its bank from its own shard. (`trainer.train_dataloader` is the dict of the combined loaders.)
        for batch, _, _ in CombinedLoader(self.trainer.train_dataloader, mode="max_size_cycle"):
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            images, volumes = batch.get("images"), batch.get("volumes")
            if images is not None and self.hparams.intra_weight > 0:
                features = self.volume_encoder.encode(images["crops"][:2])
                self.intra.fill_memory(images["index"], [self.intra.project(f) for f in features])
            if volumes is not None and self.hparams.inter_weight > 0:
                padding = volumes["padding_mask"]
                views = [self.inter.project(self.volume_encoder(volumes["views"][:, v], padding)) for v in range(2)]
                self.inter.fill_memory(volumes["index"], views)
        self.train(was_training)
        log.info("DeepCluster-v2 memory banks filled")

    def on_train_epoch_start(self) -> None:
        if self.hparams.intra_weight > 0:
            self.intra.on_epoch_start(seed=self.current_epoch)
        if self.hparams.inter_weight > 0 and getattr(self.trainer.datamodule, "num_volumes", 0) > 0:
            self.inter.on_epoch_start(seed=self.current_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | dict[str, Tensor]:
        self.intra.before_step()
        self.inter.before_step()
        out = self.compute_losses(batch)
        # Recorded without a host sync; the guard reads it with the gradients' check before the optimizer step and
        # skips the step (no update) if either is not finite.
        self.numerics_guard.check_loss({name: out[name] for name in ("intra", "inter", "mask") if name in out})
        batch_size = self._batch_size(batch)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        losses = {f"train/loss_{name}": out[name] for name in ("intra", "inter", "mask") if name in out}
        losses["train/loss"] = out["loss"]
        logging_step = self.trainer._logger_connector.should_update_logs
        # Logged metrics are averaged over the ranks in one all-reduce on logging steps (Lightning's sync_dist
        # reduces each on its own, at every step); other steps need no collective and no host sync. Except with a
        # progress bar: it shows the loss terms at every step, and Lightning reads them to the host for it anyway.
        synced: dict[str, Tensor] = {}
        if self.trainer.progress_bar_callback is not None:
            for name, value in losses.items():
                self.log(name, value, prog_bar=name != "train/loss", batch_size=batch_size, sync_dist=True)
        elif logging_step:
            synced.update(losses)
        if logging_step:
            synced.update({f"train/{name}": value for name, value in self.compute_diagnostics(out).items()})
        self._log_rank_means(synced, batch_size)
        return self._step_output(out)

    def _log_rank_means(self, metrics: dict[str, Tensor], batch_size: int) -> None:
        """Log scalars averaged over the ranks, in one all-reduce (what sync_dist's mean gives, one each)."""
        if not metrics:
            return
        values = torch.stack([value.detach().float().reshape(()) for value in metrics.values()])
        if distributed.world_size() > 1:
            values = distributed.all_reduce_sum(values) / distributed.world_size()
        for name, value in zip(metrics, values):
            self.log(name, value, batch_size=batch_size)

    @staticmethod
    def _step_output(out: dict[str, Any]) -> dict[str, Tensor]:
        """The loss, and the head-0 assignments for the collapse monitor (on_train_batch_end)."""
        return {"loss": out["loss"], **{k: out[k] for k in ("intra_assignments", "inter_assignments") if k in out}}

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """One batch of JointDataModule.predict_dataloader (images or volumes, un-augmented): ``embeddings``
        (f_intra of each image; the pooled volume feature of each volume, as L_inter sees it before its head) and
        ``assignments`` (the head-0 prototype of the intra task for images, of the inter task for volumes), with
        ``paths`` and ``kind`` for the EmbeddingWriter."""
        if "pixels" in batch:
            embeddings = self.volume_encoder.encode([batch["pixels"]])[0]
            assignments = self.intra.assign(embeddings)
        else:
            embeddings = self.volume_encoder(batch["slices"], batch["padding_mask"])
            assignments = self.inter.assign(embeddings)
        return {"paths": batch["path"], "kind": batch["kind"], "embeddings": embeddings.float(),
                "assignments": assignments}

    @torch.no_grad()
    def compute_diagnostics(self, out: dict[str, Any]) -> dict[str, Tensor]:
        """The diagnostics (class docstring) of one `compute_losses` result, as device tensors (no host sync)."""
        inputs, values = out["diagnostics"], {}
        for name, prototypes in (("intra", self.hparams.num_prototypes), ("inter", self.hparams.num_prototypes_3d)):
            task = inputs.get(name)
            if task is None:
                continue
            values[f"{name}_loss_over_chance"] = diagnostics.loss_over_chance(out[name], prototypes[0])
            predictions = torch.softmax(task.scores.float() / self.hparams.temperature, dim=1)
            values[f"{name}_prediction_entropy"] = diagnostics.normalised_entropy(predictions)
            if task.codes is not None:
                values[f"{name}_code_entropy"] = diagnostics.normalised_entropy(task.codes)
            values[f"{name}_effective_rank"] = diagnostics.effective_rank(inputs[f"{name}_features"])
        if "intra_features" in inputs:
            values["intra_embedding_norm"] = diagnostics.mean_norm(inputs["intra_features"])
        if "mask" in inputs:
            predicted, target, mask, padding = inputs["mask"]
            for baseline_name, baseline in diagnostics.MASK_BASELINES.items():
                values[f"mask_r2_vs_{baseline_name}"] = diagnostics.r2_against(
                    predicted, target, baseline(target, mask, padding), mask
                )
        return values

    @staticmethod
    def _batch_size(batch: dict[str, Any]) -> int:
        return sum(stream["index"].shape[0] for stream in batch.values() if stream is not None)

    def on_after_backward(self) -> None:
        if self.global_step < self.hparams.freeze_prototypes_steps:
            self.intra.drop_prototype_grads()
            self.inter.drop_prototype_grads()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["jointssl_format_version"] = CHECKPOINT_FORMAT_VERSION
        # LightningCLI records the class beside the hyper-parameters; a module built in Python has it too, so that
        # `jointssl predict/validate --ckpt_path` can read every checkpoint's hyper-parameters (Lightning's CLI
        # refuses bare ones under a `class_path` config: "Parsing of ckpt_path hyperparameters failed").
        checkpoint.setdefault("hyper_parameters", {}).setdefault(
            "_class_path", f"{type(self).__module__}.{type(self).__qualname__}"
        )
        # Every rank runs this hook (only rank 0 writes the file), so each rank's own queues and banks can be
        # gathered: the state_dict alone holds rank 0's, and a resumed run needs every rank's back.
        buffers = dict(self.named_buffers())
        gathered = {
            name: distributed.all_gather_cat(buffers[name].detach().unsqueeze(0)).cpu()
            for name in self.per_rank_buffer_names()
        }
        checkpoint[RANK_STATE_KEY] = [
            {name: stacked[r] for name, stacked in gathered.items()} for r in range(distributed.world_size())
        ]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        version = checkpoint.get("jointssl_format_version")
        if version != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format version {version!r} is not the {CHECKPOINT_FORMAT_VERSION} this jointssl reads"
            )
        if upgrade_single_group_lars(checkpoint, self.parameters()):
            log.info("checkpoint from before timm's Lars: its one optimizer group split into the two used now")
        self._restore_rank_state(checkpoint)

    def _restore_rank_state(self, checkpoint: dict[str, Any]) -> None:
        """Put this rank's queues, banks and counts into the checkpoint's state_dict before Lightning loads it
        (this hook runs first). A checkpoint from another number of ranks cannot be split the same way: the
        queues and banks then restart empty (banks are refilled before training) and k-means labels are kept."""
        states = checkpoint.get(RANK_STATE_KEY)
        if not states:
            return
        state_dict = checkpoint["state_dict"]
        buffers = dict(self.named_buffers())
        world = distributed.world_size()
        if len(states) == world:
            own = states[distributed.rank()]
        else:
            own = {name: buffers[name].detach().clone() for name in self.per_rank_buffer_names()
                   if not name.endswith(".labels")}
            log.warning(
                "checkpoint was written by %d ranks, this run has %d: SwAV queues restart empty and DeepCluster-v2 "
                "memory banks are refilled", len(states), world,
            )
        for name, value in own.items():
            if name in state_dict:
                state_dict[name] = value
            elif name in buffers:  # non-persistent (usage counts): not part of the state_dict
                buffers[name].copy_(value)

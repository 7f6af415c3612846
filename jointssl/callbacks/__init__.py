"""Lightning callbacks of jointssl, and the figures module of the downstream tasks; configs name a callback by its
full class path.

Pretraining (JointSSL's ``configure_callbacks`` returns the first three, and an ``EmbeddingWriter`` for
`jointssl predict` when the config has none; the CLI adds the requeue):

- `jointssl.callbacks.resume.ExactResume`: each rank's RNG state in checkpoints, for bit-exact resumption.
- `jointssl.callbacks.numerics_guard.NumericsGuard`: skips a step whose loss or gradient is not finite, and stops
  the run after too many in a row.
- `jointssl.callbacks.collapse_monitor.CollapseMonitor`: prototype usage of the clustering tasks per epoch, with an
  alarm for collapse.
- `jointssl.callbacks.requeue.SlurmRequeue`: on SIGUSR1 every rank saves last.ckpt at the next batch boundary and
  the job requeues itself (added by the CLI for configs/trainer/slurm.yaml).
- `jointssl.callbacks.example_images.ExampleImageLogger`: crop, volume-view and cluster montages at an interval.
- `jointssl.callbacks.online_eval.OnlineKNNEvaluation`: weighted kNN (and linear-probe) accuracy of the encoder on
  labelled images, computed by `jointssl.evaluation.probes` as `jointssl evaluate` does.

Prediction (`jointssl predict`; docs/outputs.md): `jointssl.callbacks.prediction_writers` holds one writer per
task, `ClassificationWriter`, `SegmentationWriter`, `DetectionWriter` (downstream) and `EmbeddingWriter`
(pretraining).

Not callbacks: `jointssl.callbacks.figures` draws the ROC, FROC and segmentation-overlay pictures and saves them
(W&B or PNG beside the checkpoints) for the downstream tasks' validation ends.

The package imports none of them, so that importing one does not import the others' dependencies.
"""

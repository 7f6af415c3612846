"""Lightning callbacks of jointssl; configs name them by their full class path:

- `jointssl.callbacks.requeue.SlurmRequeue`: on SIGUSR1 every rank saves last.ckpt at the next batch boundary and
  the job requeues itself (added by the CLI for configs/trainer/slurm.yaml).
- `jointssl.callbacks.resume.ExactResume`: each rank's RNG state in checkpoints, for bit-exact resumption (JointSSL
  adds it itself).
- `jointssl.callbacks.example_images.ExampleImageLogger`: crop, volume-view and cluster montages at an interval.
- `jointssl.callbacks.online_eval.OnlineKNNEvaluation`: weighted kNN (and linear-probe) accuracy of the encoder on
  labelled images, computed by `jointssl.evaluation.probes` as `jointssl evaluate` does.

The package imports none of them, so that importing one does not import the others' dependencies.
"""

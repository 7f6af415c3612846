"""Measuring an encoder on labelled data without training it: `jointssl embed` and `jointssl evaluate`.

- `jointssl.evaluation.probes`: the one implementation of the weighted kNN and linear probes and their metrics
  (also used online during pretraining by `jointssl.callbacks.online_eval.OnlineKNNEvaluation`).
- `jointssl.evaluation.inputs`: labelled items of image / volume sources and their preprocessing.
- `jointssl.evaluation.features`: embeddings of a checkpoint's (or a random init's) encoders, saved to a folder.
- `jointssl.evaluation.protocol`: the evaluation protocol on saved embeddings (split, probes, report).

The package imports none of them, so that the online callback does not import the embedding and protocol code.
"""

"""Evaluation toolkit: feature-space sample-quality metrics and the networks that give the features.

Public API:
  feature_statistics(features) -> (mu f64[F], sigma f64[F, F])
  frechet_distance(mu1, sigma1, mu2, sigma2) -> float
  kid(features_a, features_b, *, num_subsets=100, subset_size=None, seed=0) -> (mean, std)
  precision_recall(real, fake, *, k=3, chunk_size=1024) -> (precision, recall)
  train_classifier(images, labels, *, seed, num_steps, batch_size, ...) -> (params, meta)
  load_or_train(cache_dir, images, labels, *, seed, num_steps, batch_size, ...) -> (params, meta)
  classifier_features(params, images) -> f32[N, 128];  accuracy(params, images, labels) -> float
  labelled_split(data_config, split) -> (images f32[N, S, S, C], labels i32[N])
  load_inception(path) -> variables;  inception_features(variables, images) -> f32[N, 2048]

Submodules for the evaluate stage: `protocol` (which feature network for a config, chunked sampling and
scoring, the report's rows; it imports generation, so this package does not import it), `feature_net` (the
three feature networks behind one interface, with their metric names), `moments` (float64 mean and
covariance streamed over chunks), `inception_score` (streamed IS), `streamed` (a chunked image set -> one
report row), `reference_stats` (the training split's statistics, cached and checked), `report` (the report's
Markdown). `inception_layout` is the weights file's .npz layout; `inception_weights` converts pytorch-fid's
weights into it (`convert_pytorch_fid_weights(state_dict_path, out_path)`) and is also a command line
(`python -m vqddm_jax.evaluation.inception_weights`), so this package does not import it.
"""
from vqddm_jax.evaluation.classifier import (accuracy, classifier_features, labelled_split, load_or_train,
                                             train_classifier)
from vqddm_jax.evaluation.feature_metrics import (feature_statistics, frechet_distance, kid, knn_radii,
                                                  precision_recall)
from vqddm_jax.evaluation.inception import inception_features, load_inception

__all__ = [
    "accuracy", "classifier_features", "feature_statistics",
    "frechet_distance", "inception_features", "kid", "knn_radii", "labelled_split", "load_inception",
    "load_or_train", "precision_recall", "train_classifier",
]

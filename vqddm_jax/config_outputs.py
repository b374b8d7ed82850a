"""The config sections of what is made from the trained models: `sample`, `inpaint`, `edit`, `eval`.

Part of the schema (`config_schema.base_config` takes these defaults, `VALIDATORS` these checks); apart only to
keep each file short. Like the schema, this module imports no JAX.
"""
from __future__ import annotations

from etils import epath

from vqddm_jax import masks
from vqddm_jax.config_checks import check_float, check_int, check_int_tuple, fail, field_value


def output_sections() -> dict:
  """The defaults of `sample`, `inpaint`, `edit` and `eval` (sized for the embedded MNIST-5k set)."""
  out = {}
  # temperature: τ dividing the logits of x̂_0 in every reverse step of sample, inpaint and evaluate
  # (1 = the model's own distribution; < 1 trades diversity for fidelity; the −ELBO never uses it).
  # class_labels (conditional prior): the labels sampled, in turn ((): every class in turn); guidance_scale s:
  # x̂_0 from ℓ_u + s·(ℓ_c − ℓ_u) (1 = the conditional model, 0 = the null label's; inpainting too).
  out["sample"] = dict(num_samples=64, steps=0, chunk_steps=125, seed=1, decode_batch_size=256, temperature=1.0,
                       class_labels=(), guidance_scale=1.0)
  out["inpaint"] = dict(mask="left_half", num_images=16, steps=0, seed=2)
  # --mode=edit: held-out maps 2i, 2i+1 mixed at t = round(fraction·T), λ of the positions from the first.
  out["edit"] = dict(pairs=4, t_fractions=(0.0, 0.05, 0.1, 0.25, 0.5), lambdas=(0.0, 0.25, 0.5, 0.75, 1.0), seed=4,
                     steps=0)
  # reference_stats: '' = the training split's feature statistics computed once into W/eval/, or an .npz
  # written by --mode=reference_stats; chunk_size: samples generated and featurised at a time.
  # sample_draws: R > 1 samples the samples row R times (seeds eval.seed .. eval.seed + R − 1) and reports
  # the mean and standard deviation of FD, KID, precision and recall over the draws (R − 1 more sample sets).
  # compare_masks: with the AR prior enabled, the report's comparison completes held-out images under each of
  # these masks with both priors (and both AR protocols).
  # classifier_seed: the MNIST feature classifier's own seed, apart from config.seed, so that priors trained
  # with other seeds are measured in the same feature space (and the cached reference statistics still fit).
  out["eval"] = dict(num_samples=256, step_fractions=(1, 4, 10, 40), classifier_steps=600, classifier_seed=0,
                     inpaint_images=64, inception_weights="", reference_stats="", chunk_size=512, seed=3,
                     sample_draws=1, compare_masks=("top_half", "left_half", "center", "random:0.5"),
                     guidance_scales=(1.0, 1.5, 2.0, 3.0))
  return out


def validate_sample(config) -> None:
  """`sample`: `--mode=sample`'s count, steps, chunks, seed, decoding batch and temperature."""
  check_int(config, "sample.num_samples", 1)
  check_int(config, "sample.steps", 0, config.diffusion.num_steps)
  check_int(config, "sample.chunk_steps", 1)
  check_int(config, "sample.seed", 0)
  check_int(config, "sample.decode_batch_size", 1)
  check_float(config, "sample.temperature", 0.0, 10.0, low_open=True)
  check_float(config, "sample.guidance_scale", 0.0, 100.0)
  c = config.prior.num_classes
  labels = config.sample.class_labels
  if not isinstance(labels, (tuple, list)) or not all(isinstance(y, int) and not isinstance(y, bool)
                                                      and 0 <= y < c for y in labels):
    fail("sample.class_labels", labels, f"a tuple of class labels in [0, prior.num_classes = {c}) (): every "
         "class in turn)" if c else "() for an unconditional prior (prior.num_classes = 0)")
  _check_guidance(config, "sample.guidance_scale", (config.sample.guidance_scale,))


def _check_guidance(config, field: str, scales: tuple) -> None:
  """Guidance s != 1 needs a conditional prior whose null label was trained (label_dropout > 0)."""
  if all(s == 1 for s in scales):
    return
  if config.prior.num_classes == 0:
    fail(field, field_value(config, field), "1.0 for an unconditional prior (prior.num_classes = 0)")
  if config.prior_train.label_dropout == 0:
    fail(field, field_value(config, field), "1.0 when prior_train.label_dropout = 0: guidance needs the "
         "null label, which only label dropout trains")


def validate_inpaint(config) -> None:
  """`inpaint`: the mask (a PNG mask is read and checked), count, steps and seed."""
  masks.check_mask_spec(config.inpaint.mask)
  check_int(config, "inpaint.num_images", 1)
  check_int(config, "inpaint.steps", 0, config.diffusion.num_steps)
  check_int(config, "inpaint.seed", 0)


def validate_edit(config) -> None:
  """`edit`: the pairs, the steps t as fractions of T, the fractions λ, the seed and the reverse steps."""
  check_int(config, "edit.pairs", 1)
  for name in ("t_fractions", "lambdas"):
    value = field_value(config, f"edit.{name}")
    if not isinstance(value, (tuple, list)) or not 0 < len(value) <= 64 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value):
      fail(f"edit.{name}", value, "a non-empty tuple of at most 64 numbers in [0, 1]")
  check_int(config, "edit.seed", 0)
  check_int(config, "edit.steps", 0, config.diffusion.num_steps)


def validate_eval(config) -> None:
  """`eval`: the evaluation's sizes and seeds, and the files it is given (which must exist)."""
  check_int(config, "eval.num_samples", 2)
  check_int_tuple(config, "eval.step_fractions", 1)
  check_int(config, "eval.classifier_steps", 1)
  check_int(config, "eval.classifier_seed", 0)
  check_int(config, "eval.inpaint_images", 1)
  check_int(config, "eval.seed", 0)
  check_int(config, "eval.chunk_size", 1)
  check_int(config, "eval.sample_draws", 1, 100)
  scales = config.eval.guidance_scales
  if not isinstance(scales, (tuple, list)) or not scales or not all(
      isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 100 for s in scales):
    fail("eval.guidance_scales", scales, "a non-empty tuple of numbers in [0, 100], e.g. (1.0, 1.5, 2.0, 3.0)")
  if config.prior.num_classes:
    _check_guidance(config, "eval.guidance_scales", tuple(scales))
  specs = config.eval.compare_masks
  if not isinstance(specs, (tuple, list)) or not specs or not all(isinstance(m, str) for m in specs):
    fail("eval.compare_masks", specs, "a non-empty tuple of mask specs, e.g. ('top_half', 'random:0.5')")
  for spec in specs:
    masks.check_mask_spec(spec, config.data.image_size, field="eval.compare_masks")
  weights = config.eval.inception_weights
  if weights and not epath.Path(weights).is_file():
    fail("eval.inception_weights", weights, "'' (no FID: VGG16 or classifier features) or the path of an "
         "existing weights file")
  stats = config.eval.reference_stats
  if stats and (not stats.endswith(".npz") or not epath.Path(stats).is_file()):
    fail("eval.reference_stats", stats, "'' (computed once into the work directory) or the path of an "
         "existing .npz written by --mode=reference_stats")

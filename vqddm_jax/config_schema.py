"""Every config field with its default, and the validation run when a config is loaded.

Experiment files under `configs/` start from `base_config()` and override what differs; `validate_config` is
called by `main` after command-line overrides and before any work, so a bad value stops the run at once with a
`ConfigError` (a `ValueError`) that names the field, the value and what is allowed. Each section has one
validator named for it (`VALIDATORS`), written with the checks of `config_checks`; the names a field may
choose from come from `vqddm_jax.choices`, which the code acting on them imports too. The keys of `vqvae`
and `prior` are the attributes of the modules they build (`models.vqvae.VQVAE`, `models.unet.UNet`).
Validation needs no device: this module imports neither JAX nor TensorFlow. The checks that depend on the
number of devices run after `jax.distributed` has started (`validate_for_devices`).
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from vqddm_jax import choices
from vqddm_jax.config_checks import (check_bool, check_choice, check_float, check_int, check_int_tuple,
                                     check_loop, check_optim, fail, field_value)
from vqddm_jax.config_outputs import (output_sections, validate_edit, validate_eval, validate_inpaint,
                                     validate_sample)
from vqddm_jax.data.config import validate_data
from vqddm_jax.errors import ConfigError


def optim_defaults(lr: float) -> dict:
  return dict(lr=lr, b1=0.9, b2=0.999, schedule="cosine", warmup_steps=0, grad_clip=0.0)


def gan_optim(lr: float) -> dict:
  """Adam as in the VQGAN recipe: betas (0.5, 0.9), constant rate (both networks' optimisers use it)."""
  return dict(optim_defaults(lr), b1=0.5, b2=0.9, schedule="constant")


def loss_defaults() -> dict:
  """The VQGAN loss fields of a VQ-VAE training section, off (docs/method.md §2.1): reconstruction only."""
  return dict(perceptual_weight=0.0, disc_weight=0.0, disc_start=0, disc_adaptive=True,
              disc_optim=gan_optim(1e-4))


def base_config() -> ml_collections.ConfigDict:
  """All fields with defaults sized for the embedded MNIST-5k set; experiment files override them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # XLA CPU devices on a CPU-only host (ignored on GPU/TPU): 0 = one per core, as many as divide every
  # global batch size (at most 8); n = exactly n. XLA_FLAGS=--xla_force_host_platform_device_count wins.
  c.cpu_devices = 0
  # True: floats are summed over devices in device order (all-gather, then add), so results do not depend
  # on how the devices are spread over processes; costs device-count copies of the gradients per device.
  # For reproducibility checks (the multi-host test), not for pods (parallel.set_ordered_reductions).
  c.ordered_reductions = False
  # Multi-host jobs (TPU pods, GPU clusters): jax.distributed.initialize(). Empty fields (""/0/-1) are
  # auto-detected on Cloud TPU and SLURM; elsewhere give coordinator_address, num_processes and process_id.
  # Timeouts in seconds (JAX's defaults): a process without heartbeats for heartbeat_timeout is dead and ends
  # every other; a process leaving normally waits shutdown_timeout for the others (docs/multihost.md).
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1,
                       local_device_ids="", initialization_timeout=300, heartbeat_timeout=100,
                       shutdown_timeout=300)
  # A training loop's phase (a step, the periodic work after it, a checkpoint save) that lasts longer ends
  # the job with exit code 75, which launch/tpu.py watch reruns (training/watchdog.py); 0 = no watchdog.
  c.train_watchdog_minutes = 30.0
  c.data = dict(
      source="mnist5k", tfds_name="", data_dir="", manual_dir="", image_folder="", image_key="image",
      train_split="train", eval_split="test", image_size=32, channels=1, resize="pad",
      shuffle_buffer=5_000, prefetch=2, holdout_fraction=0.02,
      class_folders=False)  # Image folders: label = sorted index of its class sub-folder (ImageFolder's rule).
  c.vqvae = dict(
      ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32, embed_dim=32,
      codebook_size=256, groups=8, dropout=0.0, dtype="float32", attn_at_resolution=0)
  # attn_at_resolution: 0 = attention where the feature map is attn_resolutions px (by the actual size); N =
  # where it would be for N-px inputs, as taming places it (imported tokenizers at other sizes match taming's).
  # beta: the commitment weight β of the VQ loss (docs/method.md §2); ReFiT's fine-tune uses none.
  c.vqvae_train = dict(
      batch_size=16, num_steps=1200, optim=optim_defaults(2e-3), ema_decay=0.99, beta=0.25, recon_loss="mse",
      log_every=50, checkpoint_every=400, image_every=400, eval_every=1200, eval_examples=0,
      keep_checkpoints=2, codebook_loss="ours", init_from="", **loss_defaults())
  # init_from: a tokenizer converted by `python -m vqddm_jax.convert` (docs/pretrained.md) that stage 1 starts
  # from (num_steps = 0: stage 1 is that tokenizer, imported); codebook_loss: where β goes ('ours': on the
  # commitment term; 'taming_legacy': on the codebook term, as taming's released tokenizers were trained).
  # The PatchGAN of stage 1 and ReFiT (one architecture: ReFiT starts from stage 1's when it has one).
  c.discriminator = dict(ndf=64, num_layers=3)
  c.refit = dict(
      enabled=True, num_codes=128, num_features=20_000, kmeans_iters=300, kmeans_batch_size=4096,
      kmeans_init="kmeans++", kmeans_refine_iters=20, kmeans_nested=(), kmeans_overrelax=1.0,
      batch_size=16, num_steps=300,
      optim=optim_defaults(5e-4), ema_decay=0.99, log_every=50, checkpoint_every=300, image_every=300,
      eval_every=300, eval_examples=0, keep_checkpoints=2, recon_loss="mse", **loss_defaults())
  c.encode = dict(batch_size=256)
  c.diffusion = dict(num_steps=250, schedule="cosine", parametrization="residual",
                     importance_sampling=True)
  c.prior = dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attention=True, mid_attention=True,
                 groups=8, dropout=0.0, softmax_q=True, time_scale=1.0, dtype="float32", num_classes=0)
  # prior.num_classes: C > 0 makes the prior class-conditional on the images' labels (0: unconditional). It is
  # the UNet's `num_labels` (its `num_classes` is K); label_dropout: the fraction of training maps whose label
  # is replaced by the null label, so one network is both p(z | y) and p(z) (classifier-free guidance).
  c.prior_train = dict(
      batch_size=32, num_steps=6000, optim=optim_defaults(1e-3), ema_decay=0.998, log_every=50,
      checkpoint_every=2000, eval_every=6000, eval_examples=0, eval_t_samples=16, t_buckets=4,
      keep_checkpoints=2, max_code_maps=0, hybrid_ce_weight=0.0, label_dropout=0.1)
  # max_code_maps: train on the first N stored maps (0 = all). hybrid_ce_weight: λ of D3PM's hybrid loss,
  # −ELBO + λ·(−log p̂(z_0 | z_t)), both in bits per code (0 = the pure −ELBO of the paper).
  c.update(ar_sections())
  c.update(output_sections())
  return c


def ar_sections() -> dict:
  """The autoregressive prior beside the diffusion prior (`--mode=train_ar`, W/ar/; docs/comparison.md):
  taming-transformers' GPT over the same code maps in raster order, trained only when ar_train.enabled.
  `ar` holds the attributes of `models.gpt.GPT` (the default: 2.85 M parameters, the default denoiser's size);
  ar_train.optim is AdamW (betas 0.9, 0.95 as taming) whose weight decay acts on the Dense kernels only.
  ar_sample: τ, top-k (0 = all codes) and top-p (1 = all) of its sampling and inpainting, and N, the
  candidates of the sample-then-reweight inpainting protocol (exact in the limit only at τ = 1, k = 0, p = 1).
  2000 steps, not the diffusion prior's 6000: on the 4500 MNIST code maps this GPT overfits after ~2000 steps of
  batch 32 (held-out 1.60 bits/code at step 2000 of a 6000-step run, 2.05 at 3000, 2.79 at 4000;
  docs/comparison.md), while the diffusion prior's held-out −ELBO still falls at 6000."""
  return dict(
      ar=dict(width=240, num_layers=4, num_heads=8, mlp_ratio=4, dropout=0.0, dtype="float32"),
      ar_train=dict(
          enabled=False, batch_size=32, num_steps=2000,
          optim=dict(optim_defaults(1e-3), b2=0.95, warmup_steps=200, weight_decay=0.01), ema_decay=0.998,
          log_every=50, checkpoint_every=1000, eval_every=500, eval_examples=0, keep_checkpoints=2),
      ar_sample=dict(temperature=1.0, top_k=0, top_p=1.0, candidates=16))


# ----------------------------------------------------------------------------------------------- checks
# The shapes several sections share: an optimiser, a training loop, VQ-VAE training, a GroupNorm network.


def check_vq_training(config, prefix: str) -> None:
  """What a VQ-VAE training section (`vqvae_train`, `refit`) has besides its loop: the image interval and
  the VQGAN losses (docs/method.md §2.1)."""
  check_choice(config, f"{prefix}.recon_loss", choices.RECON_LOSSES)
  check_float(config, f"{prefix}.perceptual_weight", 0.0)
  check_float(config, f"{prefix}.disc_weight", 0.0)
  check_int(config, f"{prefix}.disc_start", 0)
  check_bool(config, f"{prefix}.disc_adaptive")
  check_optim(config, f"{prefix}.disc_optim")
  check_int(config, f"{prefix}.image_every", 1)
  size, weight = config.data.image_size, field_value(config, f"{prefix}.perceptual_weight")
  if weight > 0 and size < 16:
    fail(f"{prefix}.perceptual_weight", weight,
         f"0 for {size}x{size} images (LPIPS needs data.image_size >= 16: VGG16 pools by 16)")


def check_groups(config, section: str) -> None:
  """`section.groups` (GroupNorm groups) divides the width of every level, `ch * ch_mult[l]`, and `ch`."""
  s = config[section]
  widths = sorted({s.ch * m for m in s.ch_mult} | {s.ch})
  if any(w % s.groups for w in widths):
    fail(f"{section}.groups", s.groups, f"a divisor of every level width {tuple(widths)}")


def validate_distributed(config) -> None:
  """`distributed`: the `jax.distributed.initialize` arguments, all given or all left for auto-detection."""
  d = field_value(config, "distributed")
  check_bool(config, "distributed.enabled")
  if d.coordinator_address and not d.coordinator_address.rpartition(":")[2].isdigit():
    fail("distributed.coordinator_address", d.coordinator_address, "'' (auto) or 'HOST:PORT'")
  check_int(config, "distributed.num_processes", 0)
  check_int(config, "distributed.process_id", -1)
  check_int(config, "distributed.initialization_timeout", 1)
  check_int(config, "distributed.heartbeat_timeout", 2)
  check_int(config, "distributed.shutdown_timeout", 1)
  ids = d.local_device_ids
  if ids and not all(p.strip().isdigit() for p in ids.split(",")):
    fail("distributed.local_device_ids", ids, "'' (auto) or comma-separated device ids such as '0,1,2,3'")
  given = {"coordinator_address": bool(d.coordinator_address), "num_processes": d.num_processes > 0,
           "process_id": d.process_id >= 0}
  if any(given.values()) and not all(given.values()):
    missing = ", ".join(f"config.distributed.{k}" for k, v in given.items() if not v)
    raise ConfigError(f"config.distributed: coordinator_address, num_processes and process_id go together "
                      f"(all set, or all empty for auto-detection on Cloud TPU / SLURM); missing {missing}")
  if given["process_id"] and d.process_id >= d.num_processes:
    fail("distributed.process_id", d.process_id, f"an integer in [0, {d.num_processes - 1}] "
         "(config.distributed.num_processes - 1)")


def validate_vqvae(config) -> None:
  """`vqvae`: the stage-1 model, and the image size its downsampling must divide."""
  for name in ("ch", "z_channels", "embed_dim", "groups"):
    check_int(config, f"vqvae.{name}", 1)
  check_int_tuple(config, "vqvae.ch_mult", 1)
  check_int(config, "vqvae.num_res_blocks", 0)
  check_int_tuple(config, "vqvae.attn_resolutions", 1, nonempty=False)
  check_int(config, "vqvae.codebook_size", 2)
  check_int(config, "vqvae.attn_at_resolution", 0)
  check_float(config, "vqvae.dropout", 0.0, 1.0)
  check_choice(config, "vqvae.dtype", choices.DTYPES)
  check_groups(config, "vqvae")
  levels = len(config.vqvae.ch_mult)
  if config.data.image_size % 2 ** (levels - 1):
    fail("data.image_size", config.data.image_size, f"a multiple of the encoder's downsampling factor "
         f"{2 ** (levels - 1)} (len(vqvae.ch_mult) = {levels})")


def validate_vqvae_train(config) -> None:
  """`vqvae_train`: stage 1's loop (0 steps only when importing a tokenizer), commitment weight and losses."""
  t = config.vqvae_train
  if not isinstance(t.init_from, str):
    fail("vqvae_train.init_from", t.init_from, "'' (train from scratch) or the folder of a converted tokenizer")
  if t.num_steps == 0 and not t.init_from:
    fail("vqvae_train.init_from", t.init_from, "the folder of a converted tokenizer when vqvae_train.num_steps = 0 "
         "(stage 1 imported, as configs/celeba.py:taming_f16 does; docs/pretrained.md), or num_steps >= 1")
  check_loop(config, "vqvae_train", min_steps=0 if t.init_from else 1)
  check_float(config, "vqvae_train.beta", 0.0)
  check_choice(config, "vqvae_train.codebook_loss", choices.CODEBOOK_LOSSES)
  check_vq_training(config, "vqvae_train")


def validate_refit(config) -> None:
  """`refit`: the k-means codebook rebuild and the decoder's fine-tune (loop and losses as stage 1)."""
  check_bool(config, "refit.enabled")
  check_int(config, "refit.num_features", 1)
  check_int(config, "refit.num_codes", 1, config.refit.num_features)
  check_int(config, "refit.kmeans_iters", 0)
  check_int(config, "refit.kmeans_batch_size", 1)
  check_choice(config, "refit.kmeans_init", choices.KMEANS_INITS)
  check_int(config, "refit.kmeans_refine_iters", 0)
  # Over-relaxation α >= 2 overshoots the mean by more than the step it corrects; 1 is plain Lloyd.
  check_float(config, "refit.kmeans_overrelax", 0.0, 2.0, low_open=True, high_open=True)
  nested = config.refit.kmeans_nested
  ok = isinstance(nested, (tuple, list)) and len(nested) <= 16 and all(
      isinstance(level, (tuple, list)) and len(level) == 2
      and all(isinstance(v, int) and not isinstance(v, bool) for v in level)
      and level[0] >= 1 and level[1] >= 0 for level in nested)
  if not ok:
    fail("refit.kmeans_nested", nested, "a tuple of at most 16 (num_points >= 1, lloyd_steps >= 0) "
         "pairs, e.g. ((16384, 6), (65536, 2)); () for none")
  check_loop(config, "refit")
  check_vq_training(config, "refit")


def validate_discriminator(config) -> None:
  """`discriminator`: the PatchGAN; when a section trains with it, its depth must leave patch logits."""
  check_int(config, "discriminator.ndf", 1)
  check_int(config, "discriminator.num_layers", 1)
  size, layers = config.data.image_size, config.discriminator.num_layers
  used = config.vqvae_train.disc_weight > 0 or config.refit.disc_weight > 0
  if used and size < 3 * 2 ** layers:  # Each stride-2 layer halves the side; the two stride-1 layers take 2.
    fail("discriminator.num_layers", layers, f"at most log2(data.image_size / 3) = "
         f"{max(size // 3, 1).bit_length() - 1} for {size}x{size} images (else no patch logits)")


def validate_encode(config) -> None:
  """`encode`: the batch of stage 1's encoding of the data into code maps."""
  check_int(config, "encode.batch_size", 1)


def validate_diffusion(config) -> None:
  """`diffusion`: the multinomial diffusion's steps, schedule, parametrisation and sampling of t."""
  check_int(config, "diffusion.num_steps", 1)
  check_choice(config, "diffusion.schedule", choices.SCHEDULE_KINDS)
  check_choice(config, "diffusion.parametrization", choices.PARAMETRIZATIONS)
  check_bool(config, "diffusion.importance_sampling")


def validate_prior(config) -> None:
  """`prior`: the denoiser, and the code maps its levels must divide."""
  check_int(config, "prior.ch", 1)
  check_int_tuple(config, "prior.ch_mult", 1)
  check_int(config, "prior.num_res_blocks", 1)
  for name in ("attention", "mid_attention", "softmax_q"):
    check_bool(config, f"prior.{name}")
  check_int(config, "prior.groups", 1)
  check_float(config, "prior.dropout", 0.0, 1.0)
  check_float(config, "prior.time_scale", 0.0, low_open=True)
  check_choice(config, "prior.dtype", choices.DTYPES)
  check_int(config, "prior.num_classes", 0)
  p = config.prior
  if p.dropout > 0 and p.num_res_blocks < 2:
    # The denoiser drops out between the ResnetBlocks of a down-path level (the authors' placement), so with
    # one block per level a rate would be accepted and silently do nothing.
    fail("prior.dropout", p.dropout, "0.0 when prior.num_res_blocks = 1 (dropout sits between the "
         "down-path ResnetBlocks of a level; set prior.num_res_blocks >= 2 to use it)")
  check_groups(config, "prior")
  code_size = config.data.image_size // 2 ** (len(config.vqvae.ch_mult) - 1)
  if code_size % 2 ** (len(p.ch_mult) - 1):
    fail("prior.ch_mult", tuple(p.ch_mult), f"at most {code_size.bit_length() - 1} + 1 levels: the "
         f"{code_size}x{code_size} code maps must divide by 2**(len(prior.ch_mult) - 1)")


def validate_prior_train(config) -> None:
  """`prior_train`: stage 2's loop, held-out estimate, code-map subset and hybrid loss."""
  check_loop(config, "prior_train")
  check_int(config, "prior_train.eval_t_samples", 2)
  check_int(config, "prior_train.t_buckets", 1)
  check_int(config, "prior_train.max_code_maps", 0)
  check_float(config, "prior_train.hybrid_ce_weight", 0.0, 100.0)
  check_float(config, "prior_train.label_dropout", 0.0, 1.0, high_open=True)
  t = config.prior_train
  if 0 < t.max_code_maps < t.batch_size:
    fail("prior_train.max_code_maps", t.max_code_maps,
         f"0 (all maps) or at least one global batch (prior_train.batch_size = {t.batch_size})")


def validate_ar(config) -> None:
  """`ar`: the GPT of the autoregressive prior; the heads must divide its width."""
  for name in ("width", "num_layers", "num_heads", "mlp_ratio"):
    check_int(config, f"ar.{name}", 1)
  check_float(config, "ar.dropout", 0.0, 1.0, high_open=True)
  check_choice(config, "ar.dtype", choices.DTYPES)
  if config.ar.width % config.ar.num_heads:
    fail("ar.num_heads", config.ar.num_heads, f"a divisor of ar.width = {config.ar.width}")


def validate_ar_train(config) -> None:
  """`ar_train`: whether the AR prior is trained, and its loop and AdamW."""
  check_bool(config, "ar_train.enabled")
  check_loop(config, "ar_train")


def validate_ar_sample(config) -> None:
  """`ar_sample`: the AR prior's sampling filter (τ, top-k, top-p) and the reweighting's candidates."""
  check_float(config, "ar_sample.temperature", 0.0, 10.0, low_open=True)
  check_int(config, "ar_sample.top_k", 0)
  check_float(config, "ar_sample.top_p", 0.0, 1.0, low_open=True)
  check_int(config, "ar_sample.candidates", 1, 4096)


# Section -> its validator, run in this order (a section's checks may use the sections before it).
VALIDATORS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
    "data": validate_data, "distributed": validate_distributed, "vqvae": validate_vqvae,
    "vqvae_train": validate_vqvae_train, "refit": validate_refit, "discriminator": validate_discriminator,
    "encode": validate_encode, "diffusion": validate_diffusion, "prior": validate_prior,
    "prior_train": validate_prior_train, "ar": validate_ar, "ar_train": validate_ar_train,
    "ar_sample": validate_ar_sample, "sample": validate_sample, "inpaint": validate_inpaint,
    "edit": validate_edit, "eval": validate_eval,
}

# Global batch sizes, each split evenly over every device of every host.
BATCH_FIELDS = ("vqvae_train.batch_size", "refit.batch_size", "encode.batch_size", "prior_train.batch_size",
                "ar_train.batch_size")


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks the top-level fields and every section; returns the config unchanged or raises ConfigError
  naming the field."""
  check_int(config, "seed", 0)
  check_int(config, "cpu_devices", 0, 1024)
  check_bool(config, "ordered_reductions")
  check_float(config, "train_watchdog_minutes", 0.0)
  for validator in VALIDATORS.values():
    validator(config)
  return config


def global_batch_sizes(config: ml_collections.ConfigDict) -> list[int]:
  """The values of BATCH_FIELDS: what the device count must divide."""
  return [field_value(config, field) for field in BATCH_FIELDS]


def validate_for_devices(config: ml_collections.ConfigDict, num_devices: int, num_hosts: int) -> None:
  """The checks that need the device count: every global batch size divides over all devices."""
  for field in BATCH_FIELDS:
    value = field_value(config, field)
    if value % num_devices:
      fail(field, value, f"a multiple of the {num_devices} devices ({num_hosts} host(s) x "
            f"{num_devices // num_hosts} local): each device takes an equal share of the global batch")

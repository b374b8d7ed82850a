"""The prior's training state, per-device step and held-out −ELBO (stage 2, docs/method.md §3).

Randomness (t, z_t) is drawn from per-example keys `fold_in(fold_in(key, step), global example index)` (then
`keys.Draw`), so a step gives the same result on 8 devices as on 1.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqddm_jax import diffusion, parallel
from vqddm_jax.models import prior as prior_lib
from vqddm_jax.models.unet import UNet
from vqddm_jax.training import guard, optim
from vqddm_jax.training.keys import Draw


@flax.struct.dataclass
class PriorState:
  """Arrays only; `importance` is the importance-sampling history (checkpointed, identical on devices)."""
  step: jnp.ndarray  # i32[]
  params: Any
  ema_params: Any
  opt_state: Any
  importance: diffusion.ImportanceState


def init_state(model: UNet, optimizer: optax.GradientTransformation, key: jax.Array,
               code_shape: tuple[int, int], num_steps: int) -> PriorState:
  params = prior_lib.init_params(model, key, code_shape)
  return PriorState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params),
                    importance=diffusion.init_importance(num_steps))


def example_keys(key: jax.Array, step: jnp.ndarray, per_device: int) -> jax.Array:
  """Per-example keys from the global example index (device-count independent), `[per_device]`."""
  step_key = jax.random.fold_in(key, step)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, parallel.global_example_index(
      per_device))


def train_step(state: PriorState, batch: dict, key: jax.Array, *, model: UNet,
               optimizer: optax.GradientTransformation, sched: diffusion.Schedule,
               parametrization: str, use_importance: bool, ema_decay: float,
               t_buckets: int, hybrid_ce_weight: float = 0.0,
               label_dropout: float = 0.0) -> tuple[PriorState, dict]:
  """One per-device update on `batch['codes']: i32[b, h, w]` (z_0); call through `parallel.pmap`.

  A conditional network (`model.num_labels` > 0) also reads `batch['label']: i32[b]`; each example's label is
  replaced by the null label with probability `label_dropout` (classifier-free guidance's training).

  Draws t ~ p(t) (importance or uniform) and z_t ~ q(z_t | z_0) per example, minimises the importance-
  weighted −ELBO estimate L_t / p(t) + L_prior in bits per code (plus `hybrid_ce_weight` times the cross-
  entropy −log p̂(z_0 | z_t) in bits per code when it is > 0: D3PM's hybrid loss), averages gradients over
  devices, and folds the (t, L_t) pairs gathered from every device into the importance state (the same
  update everywhere). `loss_bits_per_code` is the −ELBO estimate alone; `x0_ce_bits_per_code` (only with a
  weight > 0) the cross-entropy.
  """
  z0 = batch["codes"]
  b, h, w = z0.shape
  big_t = sched.num_steps
  keys = example_keys(key, state.step, b)
  key_t, key_q = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in (Draw.T, Draw.Z_T))
  # Dropout masks are per device (one rng per network call); only used when dropout > 0.
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, Draw.DROPOUT), state.step),
                           jax.lax.axis_index(parallel.AXIS)) if model.dropout > 0 else None
  importance = state.importance if use_importance else None
  t, p_t = jax.vmap(lambda k: diffusion.sample_t(k, importance, num_steps=big_t))(key_t)
  z_t = jax.vmap(lambda k, z, tt: diffusion.q_sample(k, z, tt, sched))(key_q, z0, t)
  prior = diffusion.prior_kl(z0, sched)
  labels = _dropped_labels(batch, keys, model.num_labels, label_dropout)

  def loss_fn(params):
    logits = prior_lib.logits_fn(model, params, parametrization, rng, labels)(z_t, t)
    log_x0 = jax.nn.log_softmax(logits, axis=-1)
    lt = diffusion.loss_t(log_x0, z0, z_t, t, sched)
    nelbo = jnp.mean(diffusion.bits_per_code(diffusion.importance_weighted_nelbo(lt, p_t, prior), h * w))
    if hybrid_ce_weight == 0:
      return nelbo, (lt, nelbo, None)
    ce = jnp.mean(diffusion.bits_per_code(diffusion.x0_cross_entropy(log_x0, z0), h * w))
    return nelbo + hybrid_ce_weight * ce, (lt, nelbo, ce)

  (_, (lt, loss, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = parallel.pmean(grads)
  # At weight 0 ce is None: a tree without leaves, so nothing extra is reduced.
  loss, ce = parallel.pmean((loss, ce))
  all_t = jax.lax.all_gather(t, parallel.AXIS).reshape(-1)
  all_lt = jax.lax.all_gather(lt, parallel.AXIS).reshape(-1)

  def update():
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, ema_decay)
    return params, ema, opt_state, diffusion.importance.update(state.importance, all_t, all_lt)

  grad_norm, ok = guard.norm_and_finite(grads)
  ok = ok & jnp.isfinite(loss) & jnp.all(jnp.isfinite(all_lt))
  new = guard.update_if_finite(ok, update, (state.params, state.ema_params, state.opt_state,
                                            state.importance))
  out = {"loss_bits_per_code": loss, "grad_norm": grad_norm,
         "finite": ok.astype(jnp.float32),
         "importance_on": diffusion.is_ready(state.importance).astype(jnp.float32)}
  if ce is not None:
    out["x0_ce_bits_per_code"] = ce
  out.update(_bucket_means(all_t, diffusion.bits_per_code(all_lt, h * w), big_t, t_buckets))
  return PriorState(step=state.step + 1, params=new[0], ema_params=new[1], opt_state=new[2],
                    importance=new[3]), out


def _dropped_labels(batch: dict, keys: jax.Array, num_labels: int, dropout: float) -> jax.Array | None:
  """`batch['label']: i32[b]` with each replaced by the null label (`num_labels`) with probability `dropout`,
  from the example's own key (`Draw.LABEL`); None for an unconditional network."""
  if num_labels == 0:
    return None
  drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, Draw.LABEL), dropout))(keys)
  return jnp.where(drop, num_labels, batch["label"])


def _bucket_means(t: jnp.ndarray, values: jnp.ndarray, big_t: int, buckets: int) -> dict:
  """Mean of `values` per range of t (bucket i holds t in (i·T/n, (i+1)·T/n]); NaN for an empty bucket."""
  idx = jnp.clip((t - 1) * buckets // big_t, 0, buckets - 1)
  sums = jax.ops.segment_sum(values, idx, num_segments=buckets)
  counts = jax.ops.segment_sum(jnp.ones_like(values), idx, num_segments=buckets)
  means = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.nan)
  return {f"L_t_bits_t{i + 1}of{buckets}": means[i] for i in range(buckets)}


def eval_step(params: Any, batch: dict, key: jax.Array, *, model: UNet, sched: diffusion.Schedule,
              parametrization: str, t_samples: int, null_label: bool = False) -> dict:
  """Per-device sums over real (mask True) held-out maps of the Monte-Carlo −ELBO (bits/code) and its
  squared standard error; keys come from the global example index of this eval batch. A conditional
  network scores each map given `batch['label']`, or given the null label with `null_label`."""
  z0, mask = batch["codes"], batch["mask"].astype(jnp.float32)
  b, h, w = z0.shape
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, parallel.global_example_index(b))
  labels = None if model.num_labels == 0 or null_label else batch["label"]
  logits_fn = prior_lib.logits_fn(model, params, parametrization, labels=labels)
  est, se = diffusion.nelbo_monte_carlo(keys, z0, logits_fn, sched, num_samples=t_samples)
  bits, se_bits = diffusion.bits_per_code(est, h * w), diffusion.bits_per_code(se, h * w)
  return {"bits": jnp.sum(bits * mask), "se_sq": jnp.sum(jnp.square(se_bits) * mask),
          "count": jnp.sum(mask)}


def heldout_nelbo(p_eval: Callable, rparams: Any, batches: Any, key: jax.Array) -> dict[str, float]:
  """Held-out −ELBO in bits per code (mean over maps, all hosts' shares) and the standard error of that mean
  over t draws."""
  total = {"bits": 0.0, "se_sq": 0.0, "count": 0.0}
  for i, batch in enumerate(batches):
    out = jax.device_get(p_eval(rparams, batch, jax.random.fold_in(key, i)))
    for k in total:
      total[k] += float(np.asarray(out[k], np.float64).sum())
  total = {k: float(v) for k, v in parallel.sum_over_processes(total).items()}
  n = max(total["count"], 1.0)
  return {"nelbo_bits_per_code": total["bits"] / n, "stderr": float(np.sqrt(total["se_sq"]) / n),
          "num_maps": int(total["count"])}

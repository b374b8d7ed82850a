"""The autoregressive prior's training state, per-device step and held-out bits per code.

The model reads a code map in raster order after a dedicated start token and predicts every code from the codes
before it (teacher forcing): the loss is the mean cross-entropy over all h·w positions, in bits per code, which
on held-out maps is the exact negative log-likelihood −log2 p(z) / (h·w), no bound.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqddm_jax import autoregressive, parallel
from vqddm_jax.models import ar_prior
from vqddm_jax.models.gpt import GPT
from vqddm_jax.training import guard, optim

LN2 = float(np.log(2.0))


@flax.struct.dataclass
class ARState:
  """Arrays only."""
  step: jnp.ndarray  # i32[]
  params: Any
  ema_params: Any
  opt_state: Any


def init_state(model: GPT, optimizer: optax.GradientTransformation, key: jax.Array) -> ARState:
  params = ar_prior.init_params(model, key)
  return ARState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                 opt_state=optimizer.init(params))


def code_bits(model: GPT, params: Any, codes: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  """`f32[B]`: −log2 p(z) / (h·w) of each code map `codes: i32[B, h, w]`, teacher-forced in one pass
  (`rng` turns on dropout: training)."""
  seq = codes.reshape(codes.shape[0], -1)
  kwargs = {"train": True, "rngs": {"dropout": rng}} if rng is not None else {}
  logits = model.apply({"params": params}, autoregressive.shifted_inputs(seq, model.num_classes), **kwargs)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), seq[..., None], -1)
  return -jnp.mean(logp[..., 0], axis=-1) / LN2


def train_step(state: ARState, batch: dict, key: jax.Array, *, model: GPT,
               optimizer: optax.GradientTransformation, ema_decay: float) -> tuple[ARState, dict]:
  """One per-device update on `batch['codes']: i32[b, h, w]`; call through `parallel.pmap`.

  Minimises the mean cross-entropy in bits per code; gradients are averaged over devices. The step draws
  nothing but its dropout masks (per device: `fold_in(fold_in(key, step), device)`, only when dropout > 0).
  """
  rng = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(parallel.AXIS)
                           ) if model.dropout > 0 else None

  def loss_fn(params):
    return jnp.mean(code_bits(model, params, batch["codes"], rng))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads, loss = parallel.pmean((grads, loss))

  def update():
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return params, optim.ema_update(state.ema_params, params, ema_decay), opt_state

  grad_norm, ok = guard.norm_and_finite(grads)
  ok = ok & jnp.isfinite(loss)
  new = guard.update_if_finite(ok, update, (state.params, state.ema_params, state.opt_state))
  return ARState(step=state.step + 1, params=new[0], ema_params=new[1], opt_state=new[2]), {
      "loss_bits_per_code": loss, "grad_norm": grad_norm, "finite": ok.astype(jnp.float32)}


def eval_step(params: Any, batch: dict, *, model: GPT) -> dict:
  """Per-device sums over the real (mask True) held-out maps of their bits per code and its square."""
  bits = code_bits(model, params, batch["codes"])
  mask = batch["mask"].astype(jnp.float32)
  return {"bits": jnp.sum(bits * mask), "bits_sq": jnp.sum(jnp.square(bits) * mask), "count": jnp.sum(mask)}


def heldout_bits(p_eval: Callable, rparams: Any, batches: Any) -> dict[str, float]:
  """Held-out bits per code (the mean over maps of every host's share) and the standard error of that mean over
  the maps (the likelihood itself is exact: the error is the held-out set's, not a Monte-Carlo one)."""
  total = {"bits": 0.0, "bits_sq": 0.0, "count": 0.0}
  for batch in batches:
    out = jax.device_get(p_eval(rparams, batch))
    for k in total:
      total[k] += float(np.asarray(out[k], np.float64).sum())
  total = {k: float(v) for k, v in parallel.sum_over_processes(total).items()}
  n = max(total["count"], 1.0)
  mean = total["bits"] / n
  var = max(total["bits_sq"] / n - mean * mean, 0.0) * n / max(n - 1.0, 1.0)
  return {"bits_per_code": mean, "stderr": float(np.sqrt(var / n)), "num_maps": int(total["count"])}

"""Optimiser and EMA shared by the stage trainers."""
from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(optim_cfg: Any, num_steps: int) -> optax.Schedule:
  """Constant, or linear warm-up then cosine decay to 0 over `num_steps` (`optim.schedule`)."""
  lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == "constant":
    if warmup:
      return optax.linear_schedule(0.0, lr, warmup)
    return optax.constant_schedule(lr)
  return optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup,
                                            max(num_steps, warmup + 1), end_value=0.0)


def make_optimizer(optim_cfg: Any, num_steps: int) -> optax.GradientTransformation:
  """Adam (betas from the config) with optional global-norm clipping (`optim.grad_clip` > 0); AdamW when the
  section has a `weight_decay` > 0, decaying only the leaves named `kernel` (the Dense and Conv weights: not
  embeddings, position tables, norms or biases), as taming-transformers' GPT optimiser does."""
  parts = []
  if optim_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
  lr, b1, b2 = learning_rate_schedule(optim_cfg, num_steps), float(optim_cfg.b1), float(optim_cfg.b2)
  decay = float(optim_cfg.get("weight_decay", 0.0))
  if decay > 0:
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=decay, mask=kernels_only))
  else:
    parts.append(optax.adam(lr, b1=b1, b2=b2))
  return optax.chain(*parts)


def kernels_only(params: Any) -> Any:
  """True for the leaves named `kernel` (weights of linear maps), False elsewhere: the weight-decay mask."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """ema ← decay · ema + (1 − decay) · params, leaf by leaf.

  Written as ema + (1 − decay)(params − ema) so that a leaf with params == ema (e.g. a frozen encoder)
  stays bit-identical instead of drifting by rounding.
  """
  return jax.tree_util.tree_map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)

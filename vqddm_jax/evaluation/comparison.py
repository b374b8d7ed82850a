"""The paper's comparison (docs/comparison.md): the diffusion prior and the autoregressive prior side by side,
on the same code maps, scored against the same images in the same feature space with the same seeds.

One row per prior: parameters, FLOPs per sample (XLA's count of one network call, times the calls a sample
takes), held-out bits per code (the diffusion prior's −ELBO is an upper bound on −log2 p / (h·w); the AR
prior's cross-entropy is exact), sample FD / KID / precision / recall (means ± standard deviations over
`eval.sample_draws` draws), sampling wall time and network calls per sample. Then one inpainting row per mask
of `eval.compare_masks` per prior and protocol, over the same held-out images and masks (means over the same
draws, seeds `inpaint.seed + r`).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqddm_jax import ar_generation, autoregressive, generation, parallel
from vqddm_jax import files as files_lib
from vqddm_jax.evaluation import protocol
from vqddm_jax.workdir import Workdir

DIFFUSION, AR = "diffusion (VQ-DDM)", "autoregressive (GPT, raster order)"


def num_params(params: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def flops(fn: Callable, *args: Any) -> float:
  """XLA's floating-point operation count of one call of `fn(*args)` as compiled for this backend."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def diffusion_call_flops(gen: generation.Generator) -> float:
  """One denoiser call on one code map."""
  z, t = jnp.zeros((1,) + gen.code_shape, jnp.int32), jnp.ones((1,), jnp.int32)
  return flops(lambda p, z, t: gen.prior.model.apply({"params": p}, z, t), gen.prior.params, z, t)


def ar_call_flops(gen: generation.Generator) -> float:
  """One cached decoding step (one position) on one code map."""
  model = gen.ar.model
  cache = autoregressive.gpt_decoder(model, gen.ar.params).init_cache(1)
  step = lambda p, c, x: autoregressive.gpt_decoder(model, p).step(c, x)[0]  # noqa: E731
  return flops(step, gen.ar.params, cache, jnp.zeros((1,), jnp.int32))


def _ar_samples(config: Any, gen: generation.Generator, scorer: protocol.Scorer) -> tuple[dict, np.ndarray]:
  """The AR prior's samples row over the draws, its first images and its sampling seconds (first draw)."""
  ecfg, rparams = config.eval, parallel.replicate(gen.ar.params)

  def scored(seed):
    return protocol.scored_samples(config, gen, scorer, ar_generation.sample_in_chunks(
        gen, rparams, key=jax.random.key(seed), num=ecfg.num_samples, chunk_size=ecfg.chunk_size))

  first, images, seconds = scored(ecfg.seed)
  summary = protocol.draws_summary(config, dict(first, seconds=seconds), lambda seed: scored(seed)[::2])
  return summary, images


def compiled_seconds(draws: list[dict]) -> float:
  """Sampling seconds of a set: the mean over the draws after the first (which compiled the sampler), or the
  first's when there is one draw."""
  later = [d["seconds"] for d in draws[1:] if d.get("seconds") is not None]
  return float(np.mean(later)) if later else float(draws[0]["seconds"])


def _prior_row(name: str, *, params: int, call_flops: float, calls: int, bits: dict, bits_kind: str,
               samples: dict, num_samples: int) -> dict:
  seconds = compiled_seconds(samples["draws"])
  return {"prior": name, "parameters": params, "flops_per_sample": call_flops * calls,
          "network_calls_per_sample": calls, "bits_per_code": bits.get("value"), "bits_se": bits.get("se"),
          "bits_kind": bits_kind, "mean": samples["mean"], "std": samples["std"],
          "draws": len(samples["draws"]), "sampling_seconds": seconds,
          "sampling_ms_per_sample": 1e3 * seconds / num_samples}


def prior_rows(config: Any, workdir: Workdir, gen: generation.Generator, report: dict, ar_samples: dict
               ) -> list[dict]:
  """The two rows of the priors' table (see the module doc)."""
  first, num = report["steps_vs_quality"][0], config.eval.num_samples
  draws = report.get("sample_draws") or protocol.draws_summary(config, first, None)
  nelbo = files_lib.read_json(workdir.prior.eval_json) or {}
  ar_eval = files_lib.read_json(workdir.ar.eval_json) or {}
  return [
      _prior_row(DIFFUSION, params=num_params(gen.prior.params), call_flops=diffusion_call_flops(gen),
                 calls=first["steps"], samples=draws, num_samples=num,
                 bits={"value": nelbo.get("nelbo_bits_per_code"), "se": nelbo.get("stderr")},
                 bits_kind="−ELBO, upper bound"),
      _prior_row(AR, params=num_params(gen.ar.params), call_flops=ar_call_flops(gen),
                 calls=gen.ar.model.length, samples=ar_samples, num_samples=num,
                 bits={"value": ar_eval.get("bits_per_code"), "se": ar_eval.get("stderr")},
                 bits_kind="exact"),
  ]


def inpainting_rows(config: Any, workdir: Workdir, gen: generation.Generator, scorer: protocol.Scorer
                    ) -> list[dict]:
  """One row per mask of `eval.compare_masks` per prior and protocol, each over `eval.sample_draws` draws."""
  num = min(config.eval.inpaint_images, len(gen.heldout_codes))
  methods = [(DIFFUSION, None)] + [(AR, p) for p in ar_generation.PROTOCOLS]
  rows = []
  for spec in config.eval.compare_masks:
    for prior, proto in methods:
      draws, ess = [], []
      for r in range(config.eval.sample_draws):
        draw_config = config.copy_and_resolve_references()
        draw_config.inpaint.seed = config.inpaint.seed + r
        t0 = time.perf_counter()
        row, result = protocol.inpainting_row(draw_config, workdir, gen, scorer, num, mask_spec=spec,
                                              protocol=proto)
        draws.append(dict(row, seconds=time.perf_counter() - t0))
        ess += list(np.asarray(result.get("ess", [])).ravel())
      rows.append(_inpainting_summary(spec, prior, proto, gen, draws, ess, num))
      logging.info("evaluate: inpainting %s", rows[-1])
  return rows


def _inpainting_summary(spec: str, prior: str, proto: str | None, gen: generation.Generator, draws: list,
                        ess: list, num: int) -> dict:
  values = {m: np.array([d[m] for d in draws], np.float64) for m in protocol.DRAW_METRICS}
  label = "reverse process, known codes re-noised" if proto is None else ar_generation.protocol_name(
      proto, gen.ar_sampling["candidates"])
  return {"mask": spec, "prior": prior, "protocol": label, "images": num, "draws": len(draws),
          "mean": {m: float(v.mean()) for m, v in values.items()},
          "std": {m: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for m, v in values.items()},
          "ess_mean": float(np.mean(ess)) if ess else None, "seconds_per_draw": compiled_seconds(draws)}


def compare(config: Any, workdir: Workdir, gen: generation.Generator, scorer: protocol.Scorer,
            report: dict) -> tuple[dict, np.ndarray]:
  """(the report's `comparison` section, the AR prior's first samples f32[n, H, W, C] for its grid)."""
  ar_samples, images = _ar_samples(config, gen, scorer)
  return {"priors": prior_rows(config, workdir, gen, report, ar_samples),
          "inpainting": inpainting_rows(config, workdir, gen, scorer),
          "ar_sampling": dict(gen.ar_sampling), "ar_samples_grid": workdir.eval_ar_samples_grid.name}, images

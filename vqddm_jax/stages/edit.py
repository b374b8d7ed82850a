"""`--mode=edit`: held-out images mixed and re-noised at step t, then denoised by the prior (no retraining).

Pair i is the held-out code maps 2i and 2i+1 (`config.edit.pairs` pairs). For each t = round(fraction · T) of
`config.edit.t_fractions` and each λ of `config.edit.lambdas`, both maps of a pair are noised to t with
q(z_t | z_0), each position is taken from the first with probability λ, and the prior denoises the mix from t
(the authors' interpolation); each map is also re-noised to t alone and denoised (a discrete SDEdit). t = 0
changes nothing; t = T keeps nothing of the inputs. `config.edit.steps` = 0 runs every reverse step from t, S a
strided subset of S of T cut at t. Writes `workdir/edit/`: `mix.png` (per pair, rows over t, columns image 1,
λ high to low, image 2), `renoise.png` (rows: the images; columns: reconstruction, each t), `edit.npz` (every
code map and image) and `edit.json` (what made them). Not part of `--mode=all`.
"""
from __future__ import annotations

from typing import Any

from vqddm_jax import editing, generation, parallel
from vqddm_jax.stages import StageResult
from vqddm_jax.workdir import Workdir


def outputs(config: Any, workdir: Workdir) -> list[tuple[Any, dict]] | None:
  """(record file, record now) of the edits (None while a checkpoint is missing)."""
  models = generation.current_record(config, workdir)
  if models is None:
    return None
  e, num_steps = config.edit, config.diffusion.num_steps
  return [(workdir.edit_record, dict(
      models, pairs=e.pairs, t_fractions=list(e.t_fractions), t=editing.t_steps(e.t_fractions, num_steps),
      lambdas=list(e.lambdas), seed=e.seed, steps=e.steps or num_steps))]


def run(config: Any, workdir: Workdir) -> StageResult:
  """Mixes and re-noises `config.edit.pairs` pairs of held-out images over the grid of t and λ."""
  gen = generation.load_generator(config, workdir)  # Names what is missing, if anything.
  (_, record), = outputs(config, workdir)
  result = editing.edit_heldout(config, gen)
  if parallel.is_main_process():
    editing.save_edits(workdir, result, record)
  return StageResult("edit", True, tuple(map(str, (workdir.edit_mix_grid, workdir.edit_renoise_grid,
                                                   workdir.edit_npz))))

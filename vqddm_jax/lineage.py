"""Is an output current? The chain of a work directory's trained outputs, and the one check every stage uses.

The chain is stage 1 (`W/vqvae`) → ReFiT (`W/refit`, when enabled) → the code maps (`W/codes`) → the prior
(`W/prior`) and, beside it on the same code maps, the autoregressive prior (`W/ar`, when enabled) → what is made
from them (`W/samples`, `W/inpaint`, `W/eval`). Each link records what it was made from: ReFiT the stage-1 step
it was rebuilt from (`rebuild.json`), the code store the tokenizer checkpoint that encoded it (`meta.json`),
every checkpoint of either prior the code store it was trained on (checkpoint meta). A link is
current when that record equals what its upstream link holds now. When stage 1 trains further, say, ReFiT,
the code maps and the prior all describe the old tokenizer: a stage that consumes them must stop rather than
decode the old prior's codes with the new decoder. The registry (`stages.run_stage`) checks the chain up to
what a stage consumes before the stage runs, and says what to remove (it knows which stage makes each link
and which follow it); `vqddm_jax.load` checks it before restoring.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from etils import epath

from vqddm_jax import checkpointing
from vqddm_jax import files as files_lib
from vqddm_jax.errors import MismatchError
from vqddm_jax.workdir import Workdir

LINKS = ("vqvae", "refit", "codes", "prior", "ar")  # ReFiT and the AR prior only while enabled.
PRIORS = ("prior", "ar")  # The two links made from the code maps, side by side (not one after the other).


def tokenizer_link(config: Any) -> str:
  """The link whose model encodes and decodes: ReFiT when enabled, else stage 1."""
  return "refit" if config.refit.enabled else "vqvae"


def links(config: Any) -> list[str]:
  """The link names `config` has (ReFiT and the AR prior only when enabled), upstream first."""
  off = {"refit": not config.refit.enabled, "ar": not config.ar_train.enabled}
  return [link for link in LINKS if not off.get(link)]


def chain_to(config: Any, link: str) -> list[str]:
  """The links from stage 1 down to `link`, in order: its upstream ones and itself (one prior, not both)."""
  chain = [name for name in links(config) if name not in PRIORS]
  return chain[:chain.index(link) + 1] if link in chain else chain + [link]


def folder(workdir: Workdir, link: str) -> epath.Path:
  return workdir.code_store if link == "codes" else workdir.train(link).root


def holds(config: Any, workdir: Workdir, link: str) -> dict | None:
  """What `link` holds now (the record its consumers store), or None when it has nothing yet."""
  del config
  if link == "codes":
    from vqddm_jax.data import codes as codes_lib  # TensorFlow: only where code maps are involved.
    meta = codes_lib.read_meta(workdir.code_store)
    return None if meta is None else {k: meta.get(k) for k in ("tokenizer", "step", "codebook_size")}
  step = checkpointing.latest_step(workdir.train(link).checkpoints)
  return None if step is None else {"stage": link, "step": int(step)}


def made_from(config: Any, workdir: Workdir, link: str) -> dict | None:
  """What `link`'s output records of its upstream link (None for stage 1, or when `link` holds nothing)."""
  if link == "refit":
    rebuild = files_lib.read_json(workdir.refit_rebuild)
    return None if rebuild is None else {"stage": "vqvae", "step": rebuild["stage1_step"]}
  if link == "codes":
    held = holds(config, workdir, "codes")
    return None if held is None else {"stage": held["tokenizer"], "step": held["step"]}
  if link in PRIORS:
    directory = workdir.train(link).checkpoints
    step = checkpointing.latest_step(directory)
    if step is None:
      return None
    ckpt = checkpointing.Checkpointer(directory, read_only=True)
    try:
      return ckpt.restore_meta(step).get("codes")
    finally:
      ckpt.close()
  return None


def upstream(config: Any, link: str) -> str | None:
  chain = chain_to(config, link)
  return None if link == "vqvae" else (tokenizer_link(config) if link == "codes" else chain[-2])


@dataclasses.dataclass(frozen=True)
class Stale:
  """A link whose output was made from something its upstream link no longer holds."""
  link: str
  upstream: str
  recorded: dict
  now: dict


def first_stale(config: Any, workdir: Workdir, through: str) -> Stale | None:
  """The first link, from stage 1 up to and including `through`, that is not current (None if all are)."""
  for link in chain_to(config, through)[1:]:
    up = upstream(config, link)
    recorded, now = made_from(config, workdir, link), holds(config, workdir, up)
    if recorded is not None and now is not None and recorded != now:
      return Stale(link, up, recorded, now)
  return None


class StaleError(MismatchError):
  """A link of the chain was made from an upstream output that has changed since."""

  def __init__(self, stale: Stale, workdir: Workdir):
    self.stale, self.workdir = stale, workdir
    super().__init__(f"{self.describe()}. Rerun `python -m vqddm_jax.main --workdir={workdir.root}` "
                     "(--mode=all) to be told what to remove and redo")

  def describe(self) -> str:
    stale = self.stale
    what = {"refit": "ReFiT", "codes": "the code maps", "prior": "the prior", "ar": "the AR prior"}[stale.link]
    return (f"{what} under {folder(self.workdir, stale.link)} {'were' if stale.link == 'codes' else 'was'} "
            f"made from {_describe(stale.recorded)}, but {folder(self.workdir, stale.upstream)} now holds "
            f"{_describe(stale.now)}")


def check(config: Any, workdir: Workdir, through: str | None | tuple[str, ...]) -> None:
  """Raises StaleError when a link up to `through` (a link name, 'tokenizer', None for nothing, or a tuple of
  these: each is checked) was made from an upstream output that has changed since, naming both."""
  for name in through if isinstance(through, tuple) else (through,):
    name = tokenizer_link(config) if name == "tokenizer" else name
    if name not in links(config):  # Nothing, or ReFiT / the AR prior while disabled.
      continue
    stale = first_stale(config, workdir, name)
    if stale is not None:
      raise StaleError(stale, workdir)


def _describe(record: dict) -> str:
  if "tokenizer" in record:
    return f"code maps of {record['tokenizer']} step {record['step']} (K = {record.get('codebook_size')})"
  return f"{record['stage']} step {record['step']}"

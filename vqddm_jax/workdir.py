"""The one owner of a run's work directory: its layout (which file is where), by name.

Layout (W = `--workdir`, a local folder or an object-store URI such as `gs://bucket/run`):
```
W/vqvae/    stage 1        checkpoints/  tensorboard/  images/recon_<step>.png  eval.json
W/refit/    ReFiT          the same, plus rebuild.json  features.npy  report.json  report.md
W/codes/    the code maps of the training and held-out splits (a TFDS data set) and meta.json
W/prior/    stage 2        checkpoints/  tensorboard/  eval.json
W/ar/       the autoregressive prior (when config.ar_train.enabled): the same as W/prior/
W/samples/<prior step>/samples_S<steps>_n<N>_seed<seed>[_tau<τ>].png|.npz|.json
W/samples/ar/<AR step>/samples_n<N>_seed<seed>[_tau<τ>][_k<k>][_p<p>].png|.npz|.json
W/inpaint/<mask>/grid.png  inpaint.npz  inpaint.json    ar_prefix/  ar_reweight<N>/ (the AR prior's, alike)
W/edit/     mix.png  renoise.png  edit.npz  edit.json (held-out maps mixed / re-noised at t, denoised)
W/eval/     report.json  report.md  samples.png  samples_ar.png  classifier.msgpack
            inpaint/<mask>/[ar_<protocol>/] (evaluate's own completions)
            reference_stats_<network>.npz (feature statistics of the whole training split)
W/config.json   the config the run was made with, the code version, the date, accepted changes (run_config)
W/lock.json     the job that holds the work directory while it runs (run_lock)
```
Stages ask a `Workdir` for paths and never join strings. Paths are `etils.epath.Path`s, read and written
through `vqddm_jax.files`, so `gs://` work directories work wherever local ones do (TensorFlow's file
system serves `gs://` to epath, TensorBoard and TFDS; Orbax takes the same paths).
"""
from __future__ import annotations

import dataclasses
import os

from etils import epath

from vqddm_jax import files as files_lib

TRAIN_STAGES = ("vqvae", "refit", "prior", "ar")


# The file `launch/tpu.py sync` writes at the top of the code directory it puts on a TPU worker (launch/tpu_vm.py
# keeps a copy of this name; tests/test_launch_safety.py checks the two agree). The next sync replaces that
# tree whole, so nothing a run writes may live under it.
SYNC_MARKER = ".vqddm_synced"


def check_not_in_synced_tree(path: str | os.PathLike) -> None:
  """Refuses a local work directory inside a code tree that `launch/tpu.py sync` made (and will replace).

  A URI (`gs://...`) passes. The path need not exist yet. Symbolic links are resolved first: what counts is
  where the files would really be written.

  Raises:
    ConfigError: `path` or one of its parents holds SYNC_MARKER; the message names --workdir, the tree and why.
  """
  text = os.fspath(path)
  if "://" in text:
    return
  folder = os.path.realpath(os.path.expanduser(text))
  while True:
    if os.path.isfile(os.path.join(folder, SYNC_MARKER)):
      from vqddm_jax.errors import ConfigError
      raise ConfigError(
          f"--workdir={text}: {folder} is a code directory copied by `launch/tpu.py sync` (it holds "
          f"{SYNC_MARKER}), and the next sync deletes it with every checkpoint in it: give a directory outside "
          f"it, e.g. ~/runs/NAME, or gs://BUCKET/PATH")
    parent = os.path.dirname(folder)
    if parent == folder:
      return
    folder = parent


@dataclasses.dataclass(frozen=True)
class TrainPaths:
  """What one training stage writes under `root` (`W/vqvae`, `W/refit`, `W/prior` or `W/ar`)."""
  root: epath.Path

  @property
  def checkpoints(self) -> epath.Path:
    return self.root / "checkpoints"

  @property
  def tensorboard(self) -> epath.Path:
    return self.root / "tensorboard"

  @property
  def eval_json(self) -> epath.Path:
    """The latest held-out evaluation of the stage."""
    return self.root / "eval.json"

  def image(self, step: int) -> epath.Path:
    return self.root / "images" / f"recon_{step:07d}.png"


@dataclasses.dataclass(frozen=True)
class OutputFiles:
  """A picture, its arrays and the record of what made them (the inputs a rerun compares)."""
  png: epath.Path
  npz: epath.Path
  record: epath.Path


def _path(*parts: str, doc: str) -> property:
  """A `Workdir` property: the path `root/parts...` of one file or folder of the layout."""
  return property(lambda self: self.root.joinpath(*parts), doc=doc)


class Workdir:
  """Paths of one pipeline run; see the module docstring for the layout."""

  def __init__(self, root: str | os.PathLike):
    self.root = files_lib.as_path(root)

  def __repr__(self) -> str:
    return f"Workdir({str(self.root)!r})"

  def train(self, stage: str) -> TrainPaths:
    """Paths of a training stage: 'vqvae' (stage 1), 'refit' (ReFiT fine-tune), 'prior' (stage 2) or 'ar'
    (the autoregressive prior)."""
    if stage not in TRAIN_STAGES:
      raise ValueError(f"unknown training stage {stage!r}: one of {TRAIN_STAGES}")
    return TrainPaths(self.root / stage)

  vqvae = property(lambda self: self.train("vqvae"), doc="Stage 1 (`train_vqvae`).")
  refit = property(lambda self: self.train("refit"), doc="The ReFiT fine-tune (`refit`).")
  prior = property(lambda self: self.train("prior"), doc="Stage 2, the prior (`train_prior`).")
  ar = property(lambda self: self.train("ar"), doc="The autoregressive prior (`train_ar`).")

  config_json = _path("config.json", doc="The config the run was made with and the changes later runs made "
                      "to it (`run_config`).")
  lock_file = _path("lock.json", doc="Held by the one job that runs in this work directory (`run_lock`).")
  refit_rebuild = _path("refit", "rebuild.json", doc="Held-out metrics before and right after the codebook "
                        "rebuild (written once).")
  refit_features = _path("refit", "features.npy", doc="The k-means input `f32[P, d]`.")
  code_store = _path("codes", doc="The code maps of both splits (encoded by all hosts together, written "
                     "once, read by every host).")
  samples_dir = _path("samples", doc="Every `--mode=sample` output, by prior checkpoint.")
  inpaint_dir = _path("inpaint", doc="Every `--mode=inpaint` output, by mask.")
  edit_dir = _path("edit", doc="What `--mode=edit` writes (the newest settings' edits).")
  edit_mix_grid = _path("edit", "mix.png", doc="Per pair, rows over t and columns over λ between the two "
                        "reconstructions.")
  edit_renoise_grid = _path("edit", "renoise.png", doc="Rows: the images; columns: re-noised to each t and "
                            "denoised.")
  edit_npz = _path("edit", "edit.npz", doc="Every code map and image of `--mode=edit`.")
  edit_record = _path("edit", "edit.json", doc="What made `--mode=edit`'s outputs (compared on reruns).")
  eval_dir = _path("eval", doc="What `--mode=evaluate` writes and caches.")
  eval_samples_grid = _path("eval", "samples.png", doc="The report's grid of samples.")
  eval_ar_samples_grid = _path("eval", "samples_ar.png", doc="The report's grid of the AR prior's samples.")
  classifier_cache = _path("eval", "classifier.msgpack", doc="The evaluation classifier trained on the "
                           "embedded data, reused across evaluations.")

  def refit_report(self, suffix: str) -> epath.Path:
    """`report.json` or `report.md` (suffix 'json' / 'md')."""
    return self.refit.root / f"report.{suffix}"

  def samples(self, prior_step: int, steps: int, *, num_samples: int, seed: int,
              temperature: float = 1.0, guidance_scale: float | None = None,
              class_labels: tuple[int, ...] = ()) -> OutputFiles:
    """`num_samples` samples of the prior checkpoint `prior_step` drawn with `steps` reverse steps from `seed`
    (and a sampling temperature other than 1; a conditional prior's guidance scale and chosen classes): all in
    the name, so that another set never replaces one."""
    folder = self.samples_dir / str(prior_step)
    name = (f"samples_S{steps}_n{num_samples}_seed{seed}" +
            ("" if temperature == 1.0 else f"_tau{temperature:g}") +
            ("" if guidance_scale is None else f"_s{guidance_scale:g}") +
            ("" if not class_labels else "_y" + "-".join(str(y) for y in class_labels)))
    return OutputFiles(folder / f"{name}.png", folder / f"{name}.npz", folder / f"{name}.json")

  def ar_samples(self, ar_step: int, *, num_samples: int, seed: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> OutputFiles:
    """`num_samples` samples of the AR prior's checkpoint `ar_step` drawn from `seed` with the sampling filter
    (τ, top-k, top-p) in the name where it is not the model's own distribution."""
    name = (f"samples_n{num_samples}_seed{seed}" + ("" if temperature == 1.0 else f"_tau{temperature:g}") +
            ("" if top_k == 0 else f"_k{top_k}") + ("" if top_p == 1.0 else f"_p{top_p:g}"))
    folder = self.samples_dir / "ar" / str(ar_step)
    return OutputFiles(folder / f"{name}.png", folder / f"{name}.npz", folder / f"{name}.json")

  def latest_samples_grid(self, prior: str = "prior") -> epath.Path | None:
    """The sample grid of the newest checkpoint of `prior` ('prior': the diffusion prior, or 'ar'), or None
    when it sampled nothing."""
    folder = self.samples_dir / "ar" if prior == "ar" else self.samples_dir
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    for step in reversed(steps):
      grids = sorted((folder / str(step)).glob("samples_*.png"))
      if grids:
        return grids[0]
    return None

  def inpaint(self, mask_name: str, protocol: str = "") -> OutputFiles:
    """A `--mode=inpaint` run with the mask `mask_name` (a file-name-safe form of the mask spec); `protocol`
    names the AR prior's ('ar_prefix', 'ar_reweight16'), in a folder of its own beside the diffusion prior's."""
    folder = self.inpaint_dir / mask_name / protocol if protocol else self.inpaint_dir / mask_name
    return OutputFiles(folder / "grid.png", folder / "inpaint.npz", folder / "inpaint.json")

  def eval_report(self, suffix: str) -> epath.Path:
    """`report.json` or `report.md` of `--mode=evaluate`."""
    return self.eval_dir / f"report.{suffix}"

  def reference_stats(self, network: str) -> epath.Path:
    """The cached feature statistics of the whole training split in the space of `network` ('inception',
    'vgg16' or 'classifier'), computed once and reused by every evaluation of this run."""
    return self.eval_dir / f"reference_stats_{network}.npz"

  def eval_class_grid(self, guidance_scale: float) -> epath.Path:
    """The report's grid of a conditional prior's samples at guidance scale s, one row per class."""
    return self.eval_dir / f"classes_s{guidance_scale:g}.png"

  def eval_inpaint(self, mask_name: str, protocol: str = "") -> OutputFiles:
    """Evaluate's own completions: never in `inpaint/`, where a user's `--mode=inpaint` writes."""
    folder = self.eval_dir / "inpaint" / mask_name
    folder = folder / protocol if protocol else folder
    return OutputFiles(folder / "grid.png", folder / "inpaint.npz", folder / "inpaint.json")

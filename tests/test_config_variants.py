"""The authors'-release variants of the 256×256 configs, their arguments, and `prior_train.max_code_maps`."""
import importlib.util

import numpy as np
import pytest

from conftest import ROOT, load_config
from vqddm_jax import config_schema
from vqddm_jax.config_variants import AUTHORS_FIELDS, AUTHORS_LSUN_CODE_MAPS
from vqddm_jax.data import codes as codes_lib
from vqddm_jax.errors import MismatchError

# What the variant must switch on every data set: the stage-2 points of docs/method.md §5.1 and the ReFiT
# k-means; the other declared fields may coincide with the paper preset.
MUST_DIFFER = {"diffusion.schedule", "diffusion.parametrization", "prior.softmax_q", "prior_train.ema_decay",
               "refit.kmeans_init", "refit.kmeans_iters", "refit.kmeans_refine_iters"}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _docstring(path):
  spec = importlib.util.spec_from_file_location("_doc", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.__doc__


@pytest.mark.parametrize("path,source,declared", [
    ("configs/celeba.py", "", AUTHORS_FIELDS),
    ("configs/celeba.py", "celeb_a", AUTHORS_FIELDS),
    ("configs/celeba.py", "folder", AUTHORS_FIELDS),
    ("configs/lsun_church.py", "", {**AUTHORS_FIELDS, "prior_train.max_code_maps": AUTHORS_LSUN_CODE_MAPS}),
    ("configs/lsun_church.py", "folder",
     {**AUTHORS_FIELDS, "prior_train.max_code_maps": AUTHORS_LSUN_CODE_MAPS}),
])
def test_authors_variant_changes_exactly_the_listed_fields(path, source, declared):
  paper = load_config(f"{path}:{source}" if source else path)
  authors = load_config(f"{path}:{source},authors" if source else f"{path}:authors")
  if source == "folder":
    paper.data.image_folder = authors.data.image_folder = str(ROOT)  # any existing folder validates
  config_schema.validate_config(paper)
  config_schema.validate_config(authors)
  flat_p, flat_a = _flat(paper.to_dict()), _flat(authors.to_dict())
  assert flat_p.keys() == flat_a.keys()
  diff = {k for k in flat_p if flat_p[k] != flat_a[k]}
  assert {k: flat_a[k] for k in declared} == declared
  assert diff == {k for k, v in declared.items() if flat_p[k] != v}
  assert MUST_DIFFER | ({"prior_train.max_code_maps"} if "lsun" in path else set()) <= diff
  doc = _docstring(path)
  for field in set(declared) | {"prior.time_scale"}:  # every field it sets is listed with its reason
    parent, _, leaf = field.rpartition(".")
    assert field in doc or (parent in doc and leaf in doc), field


def test_authors_time_scale_follows_t():
  """Their network embeds t · 4000 / T: 1 at T = 4000, and it tracks a changed T."""
  config = load_config("configs/lsun_church.py:authors")
  assert config.diffusion.num_steps == 4000 and config.prior.time_scale == 1.0
  config.diffusion.num_steps = 1000
  assert config.prior.time_scale == 4.0
  config.prior.time_scale = 0.5  # an explicit value still overrides
  assert config.prior.time_scale == 0.5 and config.diffusion.num_steps == 1000


@pytest.mark.parametrize("spec,words", [
    ("configs/celeba.py:author", r"unknown config argument 'author'.*'celeb_a', 'folder'.*'authors'"),
    ("configs/celeba.py:folder,celeb_a", "two data sources"),
    ("configs/celeba.py:authors,authors", "repeats"),
    ("configs/lsun_church.py:celeb_a", r"unknown config argument 'celeb_a'.*'folder'.*'authors'"),
])
def test_bad_config_arguments_say_what_is_allowed(spec, words):
  with pytest.raises(ValueError, match=words):
    load_config(spec)


@pytest.mark.parametrize("value,words", [(-1, "integer in"), (10, "at least one global")])
def test_max_code_maps_is_validated(value, words):
  config = load_config("configs/mnist.py")
  config.prior_train.max_code_maps = value
  with pytest.raises(ValueError, match=rf"config\.prior_train\.max_code_maps = .*{words}"):
    config_schema.validate_config(config)
  config.prior_train.max_code_maps = config.prior_train.batch_size
  config_schema.validate_config(config)


def test_code_batches_draw_only_from_the_first_maps_on_every_host(tmp_path):
  """A real code store: with max_maps = 40 of 103, every batch holds only maps 0..39, each epoch draws
  distinct maps, and two hosts x 2 devices together draw one host x 4 devices' global batches."""
  train = np.broadcast_to(np.arange(103, dtype=np.int32)[:, None, None], (103, 4, 4)).copy()  # map i is i
  codes_lib.write_codes(tmp_path, {"train": train, "test": train[:7]}, {"codebook_size": 103})
  codes = codes_lib.load_codes(tmp_path, "train")
  np.testing.assert_array_equal(codes, train)  # store order kept
  one = codes_lib.CodeBatches(codes, per_shard=3, num_shards=4, seed=5, max_maps=40)
  hosts = [codes_lib.CodeBatches(codes, per_shard=3, num_shards=2, seed=5, process_index=p, process_count=2,
                                 max_maps=40) for p in range(2)]
  epoch = []
  for _ in range(9):  # 40 // 12 = 3 batches per epoch: three epochs
    batch = next(one)["codes"]
    np.testing.assert_array_equal(np.concatenate([next(h)["codes"] for h in hosts]), batch)
    ids = batch[..., 0, 0].reshape(-1)
    assert ids.max() < 40
    epoch.extend(ids)
    if len(epoch) == 36:
      assert len(set(epoch)) == 36
      epoch = []
  assert one.position == hosts[0].position == hosts[1].position == {"epoch": 2, "batch": 3}
  everything = codes_lib.CodeBatches(codes, per_shard=3, num_shards=4, seed=5, max_maps=0)
  assert max(next(everything)["codes"].max() for _ in range(8)) >= 40  # 0 = all maps


@pytest.mark.parametrize("bad", [-1, 12])
def test_a_code_store_holding_a_code_outside_the_codebook_is_refused(tmp_path, bad):
  """A negative code would wrap in the priors' gathers (the AR prior would read its start row) and a code >= K
  make every step that draws it non-finite: reading such a store names it, the code and what to redo."""
  train = np.zeros((5, 4, 4), np.int32)
  train[3, 1, 2] = bad
  codes_lib.write_codes(tmp_path, {"train": train}, {"codebook_size": 12})
  with pytest.raises(MismatchError, match=rf"split 'train' under .* hold code {bad}, outside \[0, 12\).*"
                                          r"rerun --mode=encode"):
    codes_lib.load_codes(tmp_path, "train")

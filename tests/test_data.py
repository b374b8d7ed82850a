"""Input pipelines: MNIST-5k as TFDS, exact resume, eval coverage, TFDS by name (mocked), config checks."""
from __future__ import annotations

import collections
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vqddm_jax import data
from vqddm_jax.data import mnist5k


def data_config(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      source="mnist5k", tfds_name="", data_dir="", manual_dir="", image_folder="", image_key="image",
      train_split="train", eval_split="test", image_size=32, channels=1, resize="pad",
      shuffle_buffer=512, prefetch=2, holdout_fraction=0.1, class_folders=False))
  cfg.update(overrides)
  return cfg


def dict_replace(cfg: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.update(overrides)
  return out


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory) -> str:
  d = str(tmp_path_factory.mktemp("tfds"))
  start = time.monotonic()
  data.prepare(data_config(data_dir=d))
  assert time.monotonic() - start < 60  # A few seconds normally; generous for a busy 2-core machine.
  return d


@pytest.fixture(scope="module")
def mnist_arrays():
  images, labels = mnist5k.load_arrays()
  return images, labels


def to_u8(images: np.ndarray) -> np.ndarray:
  """Inverts the [-1, 1] scaling exactly (pixel values are k / 127.5 - 1)."""
  return np.rint((images + 1.0) * 127.5).astype(np.uint8)


def multiset(images: np.ndarray) -> collections.Counter:
  return collections.Counter(x.tobytes() for x in images)


def test_mnist5k_builds_with_stratified_heldout(mnist_dir, mnist_arrays):
  cfg = data_config(data_dir=mnist_dir)
  assert data.num_examples(cfg, "train") == 4500
  assert data.num_examples(cfg, "test") == 500
  assert data.prepare(cfg) == {"train": 4500, "test": 500}  # Second call: already built, nothing rebuilt.
  b = mnist5k.builder(mnist_dir)
  test_labels = [int(ex["label"]) for ex in tfds.as_numpy(b.as_dataset(split="test"))]
  assert np.bincount(test_labels, minlength=10).tolist() == [50] * 10
  train_labels = [int(ex["label"]) for ex in tfds.as_numpy(b.as_dataset(split="train"))]
  assert np.bincount(train_labels, minlength=10).tolist() == [450] * 10
  images, labels = mnist_arrays
  held = mnist5k.heldout_indices(labels)
  test_images = np.stack([ex["image"] for ex in tfds.as_numpy(b.as_dataset(split="test"))])
  assert multiset(test_images) == multiset(images[held])


def test_train_batches_shape_and_range(mnist_dir):
  cfg = data_config(data_dir=mnist_dir)
  it = data.train_batches(cfg, global_batch_size=32, num_shards=8, seed=0)
  batch = next(it)
  assert set(batch) == {"image"}
  x = batch["image"]
  assert x.shape == (8, 4, 32, 32, 1) and x.dtype == np.float32
  assert x.min() >= -1.0 and x.max() <= 1.0 and x.max() > 0.9
  # 'pad' puts the 28x28 digit in the centre with a 2-pixel background border of value 0 -> -1.
  assert np.all(x[:, :, :2] == -1.0) and np.all(x[:, :, -2:] == -1.0)
  assert it.position == {"epoch": 0, "batch": 1, "offset": 32}


def test_train_batches_rejects_indivisible_batch(mnist_dir):
  with pytest.raises(ValueError, match="not divisible"):
    data.train_batches(data_config(data_dir=mnist_dir), global_batch_size=30, num_shards=8, seed=0)
  with pytest.raises(ValueError, match="2 host"):
    data.eval_batches(data_config(data_dir=mnist_dir), split="test", global_batch_size=24, num_shards=8,
                      process_index=0, process_count=2)


def test_exact_resume_equals_uninterrupted_stream(mnist_dir):
  # 500 examples / 64 per batch = 7 batches per epoch; 10 batches cross one epoch boundary.
  cfg = data_config(data_dir=mnist_dir, train_split="test", eval_split="train")
  it = data.train_batches(cfg, global_batch_size=64, num_shards=8, seed=3)
  stream, positions = [], [it.position]
  for _ in range(10):
    stream.append(next(it)["image"])
    positions.append(it.position)
  assert positions[7] == {"epoch": 0, "batch": 7, "offset": 448}  # Next batch: the start of epoch 1.
  assert not np.array_equal(stream[0], stream[7])  # Epochs are shuffled differently.
  for k in (3, 6, 7):  # Mid-epoch; crossing into epoch 1; from the end-of-epoch position.
    resumed = data.train_batches(cfg, global_batch_size=64, num_shards=8, seed=3, position=positions[k])
    np.testing.assert_array_equal(next(resumed)["image"], stream[k])
    np.testing.assert_array_equal(next(resumed)["image"], stream[k + 1])
  other_seed = data.train_batches(cfg, global_batch_size=64, num_shards=8, seed=4)
  assert not np.array_equal(next(other_seed)["image"], stream[0])


def test_pipelines_run_without_tf_data_autotuning():
  """Autotuning's background thread made dropping each epoch's iterator wait 13-36 s in long runs
  (pipeline._options); a pipeline built here must not start it."""
  from vqddm_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  opts = pipeline._options()  # pylint: disable=protected-access
  assert opts.autotune.enabled is False and opts.deterministic is True


def test_hosts_share_each_global_batch_as_one_host_would_see_it(mnist_dir):
  """Two hosts x 2 devices see exactly the global batches, in device order, of one host x 4 devices, epoch
  after epoch, and one saved position resumes every host."""
  cfg = data_config(data_dir=mnist_dir, train_split="test", eval_split="train", shuffle_buffer=1000)
  one = data.train_batches(cfg, global_batch_size=96, num_shards=4, seed=0)
  hosts = [data.train_batches(cfg, global_batch_size=96, num_shards=2, seed=0, process_index=p,
                              process_count=2) for p in range(2)]
  for step in range(7):  # 500 // 96 = 5 whole global batches per epoch: this crosses into epoch 1.
    whole = next(one)["image"]
    parts = [next(h)["image"] for h in hosts]
    np.testing.assert_array_equal(np.concatenate(parts), whole, err_msg=f"step {step}")
    assert hosts[0].position == hosts[1].position
  assert hosts[0].position == {"epoch": 1, "batch": 2, "offset": 192}
  resumed = data.train_batches(cfg, global_batch_size=96, num_shards=2, seed=0, process_index=1,
                               process_count=2, position=hosts[0].position)
  np.testing.assert_array_equal(next(resumed)["image"], next(hosts[1])["image"])


def test_eval_covers_every_example_once(mnist_dir, mnist_arrays):
  cfg = data_config(data_dir=mnist_dir)
  images, labels = mnist_arrays
  expected = multiset(images[mnist5k.heldout_indices(labels)])
  batches = list(data.eval_batches(cfg, split="test", global_batch_size=48, num_shards=8))
  assert len(batches) == 11  # ceil(500 / 48)
  for b in batches:
    assert b["image"].shape == (8, 6, 32, 32, 1) and b["mask"].shape == (8, 6) and b["mask"].dtype == bool
  assert batches[-1]["mask"].sum() == 500 - 10 * 48
  assert batches[-1]["mask"].reshape(-1).tolist() == [True] * 20 + [False] * 28  # Padding at the end.
  real = np.concatenate([to_u8(b["image"][b["mask"]]) for b in batches])
  assert multiset(real[:, 2:30, 2:30]) == expected
  # Three simulated hosts: same batch count each, together every example exactly once.
  per_host = [list(data.eval_batches(cfg, split="test", global_batch_size=48, num_shards=8,
                                     process_index=h, process_count=3)) for h in range(3)]
  assert [len(p) for p in per_host] == [11, 11, 11]  # ceil(ceil(500 / 3) / 16) host batches
  real = np.concatenate([to_u8(b["image"][b["mask"]]) for p in per_host for b in p])
  assert multiset(real[:, 2:30, 2:30]) == expected


def test_eval_max_examples_and_labels(mnist_dir):
  cfg = data_config(data_dir=mnist_dir)
  batches = list(data.eval_batches(cfg, split="test", global_batch_size=16, num_shards=8, max_examples=40,
                                   with_labels=True))
  assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 40
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  assert labels.dtype == np.int32 and labels.min() >= 0 and labels.max() <= 9
  assert np.all(batches[-1]["label"][~batches[-1]["mask"]] == -1)


def test_train_labels_match_their_images_across_hosts_and_resume(mnist_dir, mnist_arrays):
  cfg = data_config(data_dir=mnist_dir, train_split="test", eval_split="train")
  images, labels = mnist_arrays
  label_of = {x.tobytes(): int(y) for x, y in zip(images, labels)}
  one = data.train_batches(cfg, global_batch_size=64, num_shards=4, seed=1, with_labels=True)
  hosts = [data.train_batches(cfg, global_batch_size=64, num_shards=2, seed=1, with_labels=True,
                              process_index=p, process_count=2) for p in range(2)]
  for _ in range(3):
    position = one.position
    whole, parts = next(one), [next(h) for h in hosts]
    digits = to_u8(whole["image"].reshape(-1, 32, 32, 1))[:, 2:30, 2:30]
    assert whole["label"].dtype == np.int32
    assert whole["label"].reshape(-1).tolist() == [label_of[x.tobytes()] for x in digits]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  resumed = next(data.train_batches(cfg, global_batch_size=64, num_shards=4, seed=1, with_labels=True,
                                    position=position))
  np.testing.assert_array_equal(resumed["label"], whole["label"])


def test_class_names_of_tfds_sources(mnist_dir):
  assert data.class_names(data_config(data_dir=mnist_dir)) == [str(d) for d in range(10)]
  tfds_cfg = dict(source="tfds", train_split="train", eval_split="test", channels=3)
  assert data.class_names(data_config(tfds_name="celeb_a", **tfds_cfg)) is None  # No 'label' feature.
  # The ClassLabel's names (here written in the builder's code, so known before the data set is prepared).
  assert data.class_names(data_config(tfds_name="imagenet2012", **tfds_cfg))[:2] == ["n01440764", "n01443537"]
  with pytest.raises(ValueError, match=r"config\.data\.class_folders = True is not allowed: False for "
                                       r"data\.source == 'tfds'"):
    data.validate_data_config(data_config(tfds_name="imagenet2012", class_folders=True, **tfds_cfg))
  with pytest.raises(ValueError, match=r"config\.data\.class_folders = 1 is not allowed: True or False"):
    data.validate_data_config(dict(data_config().to_dict(), class_folders=1))  # As a stored config may be.


def test_celeb_a_through_mock_data():
  cfg = data_config(source="tfds", tfds_name="celeb_a", train_split="train", eval_split="validation",
                    image_size=32, channels=3, resize="center_crop", shuffle_buffer=64)
  with tfds.testing.mock_data(num_examples=40):
    it = data.train_batches(cfg, global_batch_size=16, num_shards=8, seed=0)
    x = next(it)["image"]
    assert x.shape == (8, 2, 32, 32, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() < x.max() <= 1.0
    for _ in range(3):  # 40 // 16 = 2 batches per epoch: crosses into epoch 1.
      next(it)
    assert it.position["epoch"] == 1
    batches = list(data.eval_batches(cfg, split="validation", global_batch_size=16, num_shards=8))
  assert [int(b["mask"].sum()) for b in batches] == [16, 16, 8]
  assert batches[0]["image"].shape == (8, 2, 32, 32, 3)


def test_unprepared_tfds_fails_fast_with_instructions(tmp_path):
  cfg = data_config(source="tfds", tfds_name="celeb_a", data_dir=str(tmp_path), train_split="train",
                    eval_split="validation", image_size=64, channels=3, resize="center_crop")
  start = time.monotonic()
  with pytest.raises(data.DataNotPreparedError) as err:
    data.prepare(cfg)
  with pytest.raises(data.DataNotPreparedError):
    data.train_batches(cfg, global_batch_size=8, num_shards=8, seed=0)
  assert time.monotonic() - start < 10
  msg = str(err.value)
  assert "'celeb_a'" in msg and f"tfds build celeb_a --data_dir={tmp_path}" in msg
  assert "never downloads" in msg
  with pytest.raises(ValueError, match=r"config\.data\.channels = 1.*3 channel"):
    data.train_batches(dict_replace(cfg, channels=1), global_batch_size=8, num_shards=8, seed=0)
  with pytest.raises(ValueError, match=r"config\.data\.image_key = 'img'.*'image'"):
    data.eval_batches(dict_replace(cfg, image_key="img"), split="validation", global_batch_size=8,
                      num_shards=8)
  with pytest.raises(ValueError, match="config.data.tfds_name"):
    data.prepare(data_config(source="tfds", tfds_name="no_such_dataset_xyz", data_dir=str(tmp_path),
                             channels=3))


@pytest.mark.parametrize("field,value,match", [
    ("resize", "stretch", r"config\.data\.resize = 'stretch'.*'pad', 'center_crop'"),
    ("source", "lsun", r"config\.data\.source = 'lsun'"),
    ("channels", 4, r"config\.data\.channels = 4"),
    ("channels", True, r"config\.data\.channels = True.*one of 1, 3"),
    ("image_size", 0, r"config\.data\.image_size = 0"),
    ("holdout_fraction", 1.0, r"config\.data\.holdout_fraction = 1\.0"),
    ("shuffle_buffer", 0, r"config\.data\.shuffle_buffer = 0"),
    ("prefetch", -1, r"config\.data\.prefetch = -1"),
    ("eval_split", "train", r"config\.data\.eval_split = 'train'.*different"),
    ("image_key", "", r"config\.data\.image_key = ''"),
])
def test_validate_data_config_names_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    data.validate_data_config(data_config(**{field: value}))


def test_validate_data_config_source_requirements(tmp_path):
  data.validate_data_config(data_config())
  with pytest.raises(ValueError, match=r"config\.data\.tfds_name = ''"):
    data.validate_data_config(data_config(source="tfds", channels=3))
  with pytest.raises(ValueError, match=r"config\.data\.image_folder = ''"):
    data.validate_data_config(data_config(source="image_folder"))
  with pytest.raises(ValueError, match=r"config\.data\.image_folder = '.*missing'.*existing folder"):
    data.validate_data_config(data_config(source="image_folder", image_folder=str(tmp_path / "missing")))
  with pytest.raises(ValueError, match=r"config\.data\.channels = 3.*mnist5k"):
    data.validate_data_config(data_config(channels=3))
  cfg = data_config()
  del cfg["prefetch"]
  with pytest.raises(ValueError, match=r"config\.data\.prefetch is missing"):
    data.validate_data_config(cfg)

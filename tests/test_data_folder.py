"""Image-folder source: bad files skipped and counted, greyscale/RGBA converted to RGB and counted, splits,
exact resume when a file fails to decode."""
from __future__ import annotations

import io
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vqddm_jax import data
from vqddm_jax.data import folder
from vqddm_jax.errors import ConfigError

BAD_NAMES = ("empty.png", "trunc.jpg", "text.png")
CONVERTED_NAMES = ("alpha.png", "grey.png")  # Usable in an RGB config: converted as torchvision does.


def folder_config(root, **overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      source="image_folder", tfds_name="", data_dir="", manual_dir="", image_folder=str(root),
      image_key="image", train_split="train", eval_split="test", image_size=16, channels=3,
      resize="center_crop", shuffle_buffer=1, prefetch=1, holdout_fraction=0.25))
  cfg.update(overrides)
  return cfg


def _noise(rng, h, w, c=3) -> np.ndarray:
  return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


def _corrupt_png(rng) -> bytes:
  """A PNG whose header and end marker are intact but whose pixel data is garbage: fails only at decoding."""
  buf = io.BytesIO()
  Image.fromarray(_noise(rng, 20, 24)).save(buf, format="PNG")
  raw = bytearray(buf.getvalue())
  start = raw.find(b"IDAT") + 20
  raw[start:start + 40] = bytes(b ^ 0x5A for b in raw[start:start + 40])
  return bytes(raw)


def make_folder(root, *, good: int, seed: int = 0, odd_modes: bool = True) -> list[str]:
  """Writes `good` usable RGB images (PNG, JPEG, upper-case .JPG, palette PNG), the bad files of BAD_NAMES,
  the greyscale and RGBA files of CONVERTED_NAMES (unless `odd_modes` is False) and one PNG that passes the
  pre-check but fails to decode; returns the RGB file names."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  names = []
  for i in range(good):
    img = Image.fromarray(_noise(rng, 18 + i % 5, 22 - i % 3))
    if i % 4 == 0:
      name = f"sub/img{i:02d}.JPG"
    elif i % 4 == 1:
      name, img = f"img{i:02d}_palette.png", img.convert("P")
    else:
      name = f"img{i:02d}.png"
    os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
    img.save(os.path.join(root, name), format="JPEG" if name.endswith("JPG") else "PNG")
    names.append(name)
  open(os.path.join(root, "empty.png"), "wb").close()
  buf = io.BytesIO()
  Image.fromarray(_noise(rng, 64, 64)).save(buf, format="JPEG", quality=95)
  with open(os.path.join(root, "trunc.jpg"), "wb") as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
  with open(os.path.join(root, "text.png"), "w") as f:
    f.write("not an image\n")
  if odd_modes:
    Image.fromarray(_noise(rng, 16, 16, 4), mode="RGBA").save(os.path.join(root, "alpha.png"))
    Image.fromarray(_noise(rng, 16, 16, 1)[..., 0], mode="L").save(os.path.join(root, "grey.png"))
  with open(os.path.join(root, "corrupt.png"), "wb") as f:
    f.write(_corrupt_png(rng))
  with open(os.path.join(root, "notes.txt"), "w") as f:  # Not an image extension: ignored, not "bad".
    f.write("ignored\n")
  return names


def test_bad_files_are_skipped_counted_and_logged(tmp_path, caplog):
  root = tmp_path / "images"
  good = make_folder(root, good=12)
  before = folder.BAD_FILES.count
  with caplog.at_level(logging.WARNING):
    listing = folder.list_folder(str(root), train_split="train", eval_split="test", channels=3,
                                 holdout_fraction=0.25)
  assert folder.BAD_FILES.count - before == len(BAD_NAMES)
  listed = sorted(os.path.relpath(p, root) for s in listing.splits.values() for p in s)
  # corrupt.png passes the cheap pre-check and fails when decoded.
  assert listed == sorted(good + list(CONVERTED_NAMES) + ["corrupt.png"])
  for name in BAD_NAMES:
    assert any(name in r.getMessage() and "bad image files skipped so far" in r.getMessage()
               for r in caplog.records), name
  cfg = folder_config(root)
  n_train, n_test = data.num_examples(cfg, "train"), data.num_examples(cfg, "test")
  assert n_train + n_test == 15 and n_test > 0
  # The corrupt file is dropped when decoded, logged once, and the pass goes on.
  with caplog.at_level(logging.WARNING):
    seen = 0
    for split in ("train", "test"):
      for b in data.eval_batches(cfg, split=split, global_batch_size=4, num_shards=2):
        assert b["image"].shape == (2, 2, 16, 16, 3)
        seen += int(b["mask"].sum())
  assert seen == 14
  assert folder.BAD_FILES.count - before == len(BAD_NAMES) + 1
  assert any("corrupt.png" in r.getMessage() and "decoding failed" in r.getMessage() for r in caplog.records)


def test_greyscale_config_accepts_greyscale_only(tmp_path):
  make_folder(tmp_path, good=4)
  listing = folder.list_folder(str(tmp_path), train_split="train", eval_split="test", channels=1,
                               holdout_fraction=0.5)
  assert sorted(os.path.basename(p) for s in listing.splits.values() for p in s) == ["grey.png"]


def test_holdout_by_hash_and_split_subfolders(tmp_path):
  flat = tmp_path / "flat"
  make_folder(flat, good=40)
  cfg = folder_config(flat, holdout_fraction=0.25)
  a = folder.list_folder(str(flat), train_split="train", eval_split="test", channels=3, holdout_fraction=0.25)
  b = folder.list_folder(str(flat), train_split="train", eval_split="test", channels=3, holdout_fraction=0.25)
  assert a == b and not set(a.splits["train"]) & set(a.splits["test"])
  assert 3 <= len(a.splits["test"]) <= 20  # About a quarter of 43.
  assert data.prepare(cfg) == {"train": len(a.splits["train"]), "test": len(a.splits["test"])}
  split = tmp_path / "split"
  make_folder(split / "train", good=6, seed=1)
  make_folder(split / "val", good=3, seed=2)
  cfg = folder_config(split, eval_split="val")
  # + alpha.png, grey.png and corrupt.png each.
  assert data.num_examples(cfg, "train") == 9 and data.num_examples(cfg, "val") == 6
  with pytest.raises(ValueError, match="split 'test'"):
    data.num_examples(cfg, "test")


def test_folder_train_stream_resumes_exactly_across_decode_failures(tmp_path):
  root = tmp_path / "train_only"
  make_folder(root / "train", good=11, odd_modes=False)
  make_folder(root / "test", good=2, seed=5, odd_modes=False)
  cfg = folder_config(root)
  # 12 listed train files, one fails to decode: 11 usable -> 2 batches of 4 per epoch (+ 3 left over).
  it = data.train_batches(cfg, global_batch_size=4, num_shards=2, seed=7)
  stream, positions = [], [it.position]
  for _ in range(7):
    batch = next(it)["image"]
    assert batch.shape == (2, 2, 16, 16, 3) and -1.0 <= batch.min() and batch.max() <= 1.0
    stream.append(batch)
    positions.append(it.position)
  assert [p["epoch"] for p in positions] == [0, 0, 0, 1, 1, 2, 2, 3]
  offsets = [p["offset"] for p in positions if p["epoch"] == 0]
  assert offsets[0] == 0 and offsets[2] <= 12
  assert any(p["offset"] != p["batch"] * 4 for p in positions)  # The failed file shifts some offsets.
  for k in (1, 2, 4, 6):  # Includes end-of-epoch positions (2, 4, 6) and a shifted offset.
    resumed = data.train_batches(cfg, global_batch_size=4, num_shards=2, seed=7, position=positions[k])
    np.testing.assert_array_equal(next(resumed)["image"], stream[k])


def test_open_iterators_are_closed_before_interpreter_exit(tmp_path):
  # Without this atexit hook a process could hang at exit while TF destroyed an iterator whose worker
  # threads were inside the PIL decode call (seen in about half of the runs of a throughput script).
  from vqddm_jax.data import pipeline
  make_folder(tmp_path / "train", good=4)
  make_folder(tmp_path / "test", good=2, seed=1)
  cfg = folder_config(tmp_path)
  train = data.train_batches(cfg, global_batch_size=2, num_shards=2, seed=0)
  evals = data.eval_batches(cfg, split="test", global_batch_size=2, num_shards=2)
  next(train), next(evals)
  position = train.position
  pipeline._close_open_iterators()  # pylint: disable=protected-access  # What atexit runs.
  with pytest.raises(StopIteration):
    next(train)
  with pytest.raises(StopIteration):
    next(evals)
  assert train.position == position


def test_greyscale_and_rgba_files_are_converted_to_rgb_and_counted(tmp_path, caplog):
  rng = np.random.default_rng(3)
  root = tmp_path / "modes"
  os.makedirs(root)
  grey, rgba, rgb = _noise(rng, 16, 16, 1)[..., 0], _noise(rng, 16, 16, 4), _noise(rng, 16, 16)
  Image.fromarray(grey, mode="L").save(root / "grey.png")
  Image.fromarray(rgba, mode="RGBA").save(root / "alpha.png")
  Image.fromarray(rgb).save(root / "rgb.png")
  Image.fromarray(np.stack([grey, rgba[..., 3]], -1), mode="LA").save(root / "grey_alpha.png")
  before = folder.BAD_FILES.count
  with caplog.at_level(logging.INFO):
    listing = folder.list_folder(str(root), train_split="train", eval_split="test", channels=3,
                                 holdout_fraction=0.01)
  assert folder.BAD_FILES.count == before  # Nothing skipped.
  assert sorted(os.path.basename(p) for p in listing.splits["train"] + listing.splits["test"]) == [
      "alpha.png", "grey.png", "grey_alpha.png", "rgb.png"]
  assert any("converted 3 greyscale/RGBA files to RGB" in r.getMessage() for r in caplog.records)
  # As PIL's convert('RGB') (torchvision's ImageFolder): grey repeated to three channels, alpha dropped.
  decoded = {name: folder.decode_file(str(root / name).encode(), 3) for name in
             ("grey.png", "alpha.png", "rgb.png", "grey_alpha.png")}
  assert all(ok and img.shape == (16, 16, 3) for img, ok in decoded.values())
  np.testing.assert_array_equal(decoded["grey.png"][0], np.repeat(grey[..., None], 3, -1))
  np.testing.assert_array_equal(decoded["grey_alpha.png"][0], np.repeat(grey[..., None], 3, -1))
  np.testing.assert_array_equal(decoded["alpha.png"][0], rgba[..., :3])
  np.testing.assert_array_equal(decoded["rgb.png"][0], rgb)
  # Through the pipeline every file comes out as a 3-channel image.
  batches = list(data.eval_batches(folder_config(root, holdout_fraction=0.01), split="train",
                                   global_batch_size=4, num_shards=2))
  assert sum(int(b["mask"].sum()) for b in batches) == len(listing.splits["train"])
  assert all(b["image"].shape[-1] == 3 for b in batches)


def test_sixteen_bit_pngs_are_scaled_to_eight_bits_not_clipped(tmp_path):
  from vqddm_jax.data.tf_host import tf
  ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
  Image.fromarray(ramp).save(tmp_path / "grey16.png")  # PIL mode 'I;16'.
  rgb48 = np.stack([ramp, ramp[::-1], ramp.T], -1)
  (tmp_path / "rgb48.png").write_bytes(tf.io.encode_png(rgb48).numpy())
  with Image.open(tmp_path / "grey16.png") as im:
    assert im.mode == "I;16"
  expected = np.round(ramp / 257.0).astype(np.uint8)  # round(x * 255 / 65535)
  for channels in (1, 3):
    img, ok = folder.decode_file(str(tmp_path / "grey16.png").encode(), channels)
    assert ok and img.shape == (256, 256, channels)
    np.testing.assert_array_equal(img, np.repeat(expected[..., None], channels, -1))
    assert np.array_equal(np.unique(img), np.arange(256))  # Every level present, nothing clipped to 255.
  # PIL reads 48-bit RGB as 8 bits per channel (the high byte): a full ramp in each channel.
  img, ok = folder.decode_file(str(tmp_path / "rgb48.png").encode(), 3)
  assert ok and img.shape == (256, 256, 3)
  np.testing.assert_array_equal(img, (rgb48 >> 8).astype(np.uint8))
  assert all(np.array_equal(np.unique(img[..., c]), np.arange(256)) for c in range(3))
  # A greyscale config now lists the 16-bit greyscale file (and still refuses the colour one).
  listing = folder.list_folder(str(tmp_path), train_split="train", eval_split="test", channels=1,
                               holdout_fraction=0.01)
  assert [os.path.basename(p) for s in listing.splits.values() for p in s] == ["grey16.png"]


def test_dangling_symlinks_and_symlink_loops_are_bad_files(tmp_path, caplog):
  root, other = tmp_path / "links", tmp_path / "other"
  os.makedirs(root / "sub")
  os.makedirs(other)
  rng = np.random.default_rng(4)
  for path in (root / "a.png", root / "sub" / "b.png", other / "c.png"):
    Image.fromarray(_noise(rng, 8, 8)).save(path)
  os.symlink(tmp_path / "missing.png", root / "dangling.png")
  os.symlink(root / "loop2.png", root / "loop1.png")  # loop1 -> loop2 -> loop1
  os.symlink(root / "loop1.png", root / "loop2.png")
  os.symlink(root, root / "sub" / "up")  # A folder link back to an ancestor: would list a.png forever.
  os.symlink(other, root / "linked")  # A folder link elsewhere: followed.
  before = folder.BAD_FILES.count
  with caplog.at_level(logging.WARNING):
    listing = folder.list_folder(str(root), train_split="train", eval_split="test", channels=3,
                                 holdout_fraction=0.01)
  assert sorted(os.path.relpath(p, root) for s in listing.splits.values() for p in s) == [
      "a.png", "linked/c.png", "sub/b.png"]
  assert folder.BAD_FILES.count - before == 4
  messages = "\n".join(r.getMessage() for r in caplog.records)
  assert f"dangling.png (dangling symlink to {tmp_path / 'missing.png'})" in messages
  assert "loop1.png (symlink loop" in messages and "loop2.png (symlink loop" in messages
  assert f"sub/up (symlink loop: a link back to its parent folder {root})" in messages


def test_oversized_images_are_refused_with_their_size(tmp_path, monkeypatch, caplog):
  rng = np.random.default_rng(5)
  Image.fromarray(_noise(rng, 30, 40)).save(tmp_path / "big.png")  # 40×30 = 1200 pixels.
  Image.fromarray(_noise(rng, 30, 30)).save(tmp_path / "fits.png")  # 900 pixels.
  Image.fromarray(_noise(rng, 30, 30)).save(tmp_path / "fits.jpg", quality=95)
  monkeypatch.setattr(folder, "MAX_PIXELS", 1000)
  # PIL's own check (a warning over 500, an error over 1000, both exceptions under pytest) is not used:
  # the 900-pixel files pass and decode, the 1200-pixel one gets our reason.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
  with caplog.at_level(logging.WARNING):
    listing = folder.list_folder(str(tmp_path), train_split="train", eval_split="test", channels=3,
                                 holdout_fraction=0.01)
  assert sorted(os.path.basename(p) for s in listing.splits.values() for p in s) == ["fits.jpg", "fits.png"]
  assert any("big.png (40×30 pixels, over the limit of 1000 pixels)" in r.getMessage()
             for r in caplog.records)
  for name in ("fits.png", "fits.jpg"):
    img, ok = folder.decode_file(str(tmp_path / name).encode(), 3)
    assert ok and img.shape == (30, 30, 3)
  img, ok = folder.decode_file(str(tmp_path / "big.png").encode(), 3)  # Also refused if it reaches decoding.
  assert not ok and img.shape == (1, 1, 3)


# Class folders (config.data.class_folders): torchvision ImageFolder's rule, sorted names -> 0..C-1. Upper case
# sorts first; 'a_dog/deeper/' still belongs to class 'a_dog'.
CLASSES = ("C_upper", "a_dog", "b_cat")


def make_class_folder(root, counts: dict[str, int], *, start: int = 0) -> None:
  """Writes 16x16 solid PNGs `root/<class>/...`: red = 40 * (the class's sorted index) + 7 tells the label,
  green = a running number from `start` tells the image."""
  n = start
  for name, count in counts.items():
    for i in range(count):
      sub = os.path.join(root, name, "deeper" if i % 3 == 2 else "")
      os.makedirs(sub, exist_ok=True)
      pixel = np.array([40 * sorted(CLASSES).index(name) + 7, n, 99], np.uint8)
      Image.fromarray(np.broadcast_to(pixel, (16, 16, 3)).copy()).save(os.path.join(sub, f"i{n:03d}.png"))
      n += 1


def class_config(root, **overrides) -> ml_collections.ConfigDict:
  return folder_config(root, resize="pad", class_folders=True, **overrides)


def labels_of_pixels(images: np.ndarray) -> np.ndarray:
  """The label each image's red value encodes (images f32[..., 16, 16, 3] in [-1, 1])."""
  red = np.rint((images[..., 0, 0, 0] + 1.0) * 127.5).astype(np.int32)
  return (red - 7) // 40


def test_class_folder_labels_are_sorted_folder_indices_in_both_layouts(tmp_path):
  split = tmp_path / "split"
  make_class_folder(split / "train", {"b_cat": 5, "a_dog": 4, "C_upper": 3})
  make_class_folder(split / "test", {"a_dog": 2, "b_cat": 3}, start=100)  # Not every class: fine.
  flat = tmp_path / "flat"
  make_class_folder(flat, {"b_cat": 9, "a_dog": 9, "C_upper": 9})
  for root in (split, flat):
    cfg = class_config(root, holdout_fraction=0.3)
    assert data.class_names(cfg) == ["C_upper", "a_dog", "b_cat"]
    for name in ("train", "test"):
      batches = list(data.eval_batches(cfg, split=name, global_batch_size=4, num_shards=2, with_labels=True))
      mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
      labels = np.concatenate([b["label"].reshape(-1) for b in batches])
      images = np.concatenate([b["image"].reshape(-1, 16, 16, 3) for b in batches])
      assert labels.dtype == np.int32 and mask.sum() == data.num_examples(cfg, name) > 0
      np.testing.assert_array_equal(labels[mask], labels_of_pixels(images[mask]))
      assert np.all(labels[~mask] == -1)
  assert data.class_names(folder_config(split)) is None  # class_folders off (not set: older configs).
  assert set(next(data.train_batches(class_config(split), global_batch_size=4, num_shards=2, seed=0))) == {
      "image"}  # Labels only when asked for.


def test_class_labels_stay_aligned_across_resume_and_hosts(tmp_path):
  make_class_folder(tmp_path / "train", {"b_cat": 9, "a_dog": 7, "C_upper": 8})
  make_class_folder(tmp_path / "test", {"a_dog": 2}, start=100)
  cfg = class_config(tmp_path)
  one = data.train_batches(cfg, global_batch_size=8, num_shards=4, seed=5, with_labels=True)
  hosts = [data.train_batches(cfg, global_batch_size=8, num_shards=2, seed=5, with_labels=True,
                              process_index=p, process_count=2) for p in range(2)]
  stream, positions = [], [one.position]
  for _ in range(5):  # 24 images / 8 = 3 batches per epoch: crosses into epoch 1.
    whole, parts = next(one), [next(h) for h in hosts]
    assert whole["label"].shape == (4, 2) and whole["label"].dtype == np.int32
    np.testing.assert_array_equal(whole["label"], labels_of_pixels(whole["image"]))
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    stream.append(whole)
    positions.append(one.position)
  assert len({int(x) for b in stream for x in b["label"].ravel()}) == 3
  for k in (1, 2, 3):  # Mid-epoch, end of epoch 0, into epoch 1.
    resumed = data.train_batches(cfg, global_batch_size=8, num_shards=4, seed=5, with_labels=True,
                                 position=positions[k])
    batch = next(resumed)
    np.testing.assert_array_equal(batch["image"], stream[k]["image"])
    np.testing.assert_array_equal(batch["label"], stream[k]["label"])


def test_class_folder_mistakes_are_named(tmp_path):
  split = tmp_path / "split"
  make_class_folder(split / "train", {"a_dog": 2, "b_cat": 2})
  make_class_folder(split / "test", {"a_dog": 1, "C_upper": 1}, start=100)
  with pytest.raises(ConfigError, match=r"split 'test' .* class folder\(s\) 'C_upper' that the train "
                                             r"split 'train' does not have \(its 2 classes: 'a_dog', 'b_cat'\)"):
    data.class_names(class_config(split))
  flat = tmp_path / "flat"
  make_class_folder(flat, {"a_dog": 3})
  for name in ("loose1.png", "loose2.png"):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(flat / name)
  with pytest.raises(ConfigError, match=r"class_folders = True needs every image in a class sub-folder "
                                             r"of .*flat, but 2 image\(s\) lie directly in it "
                                             r"\('loose1.png', 'loose2.png'\)"):
    data.train_batches(class_config(flat, holdout_fraction=0.01), global_batch_size=2, num_shards=2, seed=0)
  with pytest.raises(ConfigError, match=r"class_folders = False.*set config\.data\.class_folders = True"):
    data.eval_batches(folder_config(flat), split="test", global_batch_size=2, num_shards=2, with_labels=True)
  with pytest.raises(ConfigError, match=r"config\.data\.class_folders = 'yes' is not allowed: True or"):
    data.validate_data_config(folder_config(flat, class_folders="yes"))

"""Converting peer checkpoints without PyTorch: parity with the peers' own outputs, and refusals.

The golden files under tests/fixtures/parity/ come from tools/make_parity_fixtures.py (PyTorch,
taming-transformers and the authors' unet.py, run by hand): a tiny random-weight taming VQGAN as a real
Lightning .ckpt, the authors' UNet as a state dict, and their outputs computed in float64. Here they are
converted through the command line's own entry point and our models must reproduce those outputs to 1e-5
(code indices exactly).
"""
from __future__ import annotations

import importlib
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from vqddm_jax import safe_pickle
from vqddm_jax.convert import imported, lightning_ckpt
from vqddm_jax.errors import MismatchError, MissingInputError, UserError
from vqddm_jax.models import quantizer, unet, vqvae

cli = importlib.import_module("vqddm_jax.convert.__main__")

FIXTURES = ROOT / "tests" / "fixtures" / "parity"
CKPT, YAML = FIXTURES / "taming_tiny.ckpt", FIXTURES / "taming_tiny.yaml"
UNET_PTH = FIXTURES / "authors_unet_tiny.pth"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def taming_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("taming") / "converted"
  report = cli.convert(["taming_vqgan", f"--ckpt={CKPT}", f"--config={YAML}", f"--out={out}"])
  return out, report


def _vqvae_outputs(fields, params, x, codes):
  model = vqvae.build_vqvae(fields, 3)
  variables = {"params": params}
  pre = model.apply(variables, x, method=model.encode)
  got_codes = model.apply(variables, x, method=model.encode_to_indices)
  dec = model.apply(variables, codes, method=lambda m, c: m.decode(quantizer.lookup(c, m.codebook)))
  return np.asarray(pre), np.asarray(got_codes), np.asarray(dec)


def test_taming_ckpt_matches_taming_at_its_size_and_another(taming_dir, capsys):
  """Encoder features, code indices and decoder outputs at the trained 16 px and at 32 px, where taming
  places attention by its nominal resolution (`attn_at_resolution`); by the actual size they would differ."""
  out, report = taming_dir
  fields, params = imported.load_vqvae(out)
  assert fields == dict(ch=32, ch_mult=(2, 1), num_res_blocks=2, z_channels=8, embed_dim=8, codebook_size=16,
                        groups=32, dropout=0.0, attn_resolutions=(8,), attn_at_resolution=16, dtype="float32")
  assert imported.read_record(out)["data"] == {"channels": 3, "image_size": 16}
  assert report["tensors_mapped"] == 209 and report["parameters"] == 600_699 and len(report["ignored"]) == 3
  assert report["checkpoint_entries"]["global_step"] == 1200
  golden = np.load(FIXTURES / "taming_tiny_outputs.npz")
  for size in (16, 32):
    pre, codes, dec = _vqvae_outputs(fields, params, golden[f"x{size}"], golden[f"codes{size}"])
    assert np.abs(pre - golden[f"pre_quant{size}"]).max() <= TOLERANCE
    np.testing.assert_array_equal(codes, golden[f"codes{size}"])
    assert np.abs(dec - golden[f"dec{size}"]).max() <= TOLERANCE
  by_actual_size = vqvae.build_vqvae({**fields, "attn_at_resolution": 0}, 3)  # Both rules agree at 16 px only.
  pre16 = by_actual_size.apply({"params": params}, golden["x16"], method=by_actual_size.encode)
  np.testing.assert_array_equal(pre16, _vqvae_outputs(fields, params, golden["x16"], golden["codes16"])[0])
  pre32 = by_actual_size.apply({"params": params}, golden["x32"], method=by_actual_size.encode)
  assert np.abs(pre32 - golden["pre_quant32"]).max() > 1e-2


@pytest.mark.parametrize("flags, resolution", [(["--resolution=16"], 16), ([], 256)],
                         ids=["resolution", "none"])
def test_taming_without_yaml_infers_the_same_model(tmp_path, flags, resolution, capsys):
  """Without the yaml the nominal size is --resolution or 256; the attention levels, so the outputs, stay."""
  cli.convert(["taming_vqgan", f"--ckpt={CKPT}", f"--out={tmp_path / 'out'}", *flags])
  fields, params = imported.load_vqvae(tmp_path / "out")
  assert fields["attn_at_resolution"] == resolution and fields["attn_resolutions"] == (resolution // 2,)
  golden = np.load(FIXTURES / "taming_tiny_outputs.npz")
  pre, _, _ = _vqvae_outputs(fields, params, golden["x32"], golden["codes32"])
  assert np.abs(pre - golden["pre_quant32"]).max() <= TOLERANCE
  assert ("assumed" in capsys.readouterr().out) == (not flags)


def test_authors_unet_matches_their_logits(tmp_path, capsys):
  """Their network is fed t - 1 for our step t: fed the same index, ours gives their logits."""
  cli.convert(["authors_unet", f"--ckpt={UNET_PTH}", f"--out={tmp_path / 'out'}"])
  fields, params = imported.load_unet(tmp_path / "out")
  assert fields["softmax_q"] is False and fields["time_scale"] == 1.0 and fields["ch_mult"] == (1, 2)
  golden = np.load(FIXTURES / "authors_unet_tiny_outputs.npz")
  num_codes = imported.read_record(tmp_path / "out")["num_codes"]
  model = unet.UNet(**{**fields, "dtype": jnp.float32}, num_classes=num_codes)
  np.testing.assert_array_equal(golden["time_index"], golden["t"] - 1)
  apply = jax.jit(lambda z, t: model.apply({"params": params}, z, t))
  for index, logits in zip(golden["time_index"], golden["logits"]):
    got = apply(golden["z"], jnp.full((2,), index))
    assert np.abs(np.asarray(got) - logits).max() <= TOLERANCE, index
  assert "mapped 115 tensors (float32) onto 115 arrays, 53,132 parameters" in capsys.readouterr().out


def _tampered(tmp_path: pathlib.Path, *renames: tuple[str, str]) -> str:
  """The fixture .ckpt with tensor names renamed in its pickle (same lengths, so the pickle stays valid)."""
  path = tmp_path / "tampered.ckpt"
  with zipfile.ZipFile(CKPT) as src, zipfile.ZipFile(path, "w") as dst:
    for info in src.infolist():
      data = src.read(info)
      if info.filename.endswith("data.pkl"):
        for old, new in renames:
          assert data.count(old.encode()) == 1 and len(old) == len(new)
          hold = b"\xff<swap>\xff"  # Swaps the two names where both exist; renames where only `old` does.
          data = data.replace(old.encode(), hold).replace(new.encode(), old.encode())
          data = data.replace(hold, new.encode())
      dst.writestr(info, data)
  return str(path)


def test_missing_extra_and_misshaped_names_are_listed(tmp_path, capsys):
  norm1, norm2 = "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.norm2.weight"  # 32 vs 64 wide.
  renamed = ("decoder.up.0.block.1.conv2.bias", "decoder.up.0.block.1.conv9.bias")
  path = _tampered(tmp_path, renamed, (norm1, norm2))
  assert cli.main(["taming_vqgan", f"--ckpt={path}", f"--out={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err, err
  assert err.startswith(f"{cli.PROG}: error: {path}: not the taming-transformers VQGAN"), err
  assert "1 missing [decoder.up.0.block.1.conv2.bias]" in err, err
  assert "1 unexpected [decoder.up.0.block.1.conv9.bias]" in err, err
  assert f"2 with the wrong shape [{norm1} (64,) float16 (need (32,) float), {norm2} (32,)" in err, err
  assert not (tmp_path / "out").exists()


def test_yaml_that_does_not_describe_the_checkpoint_is_refused(tmp_path):
  bad = tmp_path / "model.yaml"
  bad.write_text(YAML.read_text().replace("ch: 32", "ch: 64"))
  with pytest.raises(MismatchError, match=r"ddconfig.ch is 64, but the checkpoint .* has 32"):
    cli.convert(["taming_vqgan", f"--ckpt={CKPT}", f"--config={bad}", f"--out={tmp_path / 'out'}"])


def test_wrong_paths_are_one_line_errors(tmp_path, taming_dir, capsys):
  missing = tmp_path / "nope.ckpt"
  assert cli.main(["authors_unet", f"--ckpt={missing}", f"--out={tmp_path / 'out'}"]) == 2
  assert capsys.readouterr().err.strip() == (
      f"{cli.PROG}: error: no checkpoint file at '{missing}': give the path of a PyTorch Lightning .ckpt or "
      "a torch.save'd state dict")
  with pytest.raises(MissingInputError, match="not a converted model"):
    imported.load_vqvae(tmp_path)
  with pytest.raises(MismatchError, match="holds a converted 'taming_vqgan', not a 'authors_unet'"):
    imported.load_unet(taming_dir[0])
  with pytest.raises(MismatchError, match="is not empty"):
    cli.convert(["taming_vqgan", f"--ckpt={CKPT}", f"--out={taming_dir[0]}"])


class _Payload:
  """Runs `call(*args)` when a plain unpickler reads it."""

  def __init__(self, call, *args):
    self.call, self.args = call, args

  def __reduce__(self):
    return self.call, self.args


def _evil_ckpt(tmp_path: pathlib.Path, payload) -> str:
  path = tmp_path / "evil.ckpt"
  with zipfile.ZipFile(path, "w") as zf:
    # Hidden where a genuine checkpoint keeps callback objects, as a Lightning checkpoint would be.
    zf.writestr("archive/data.pkl", pickle.dumps(
        {"epoch": 0, "callbacks": {"ModelCheckpoint": {"state": payload}}, "state_dict": {}}, protocol=2))
    zf.writestr("archive/version", "3\n")
  return str(path)


@pytest.mark.parametrize("make", [
    lambda marker: _Payload(os.system, f"touch {marker}"),
    lambda marker: _Payload(subprocess.call, ["touch", str(marker)]),
    lambda marker: _Payload(eval, f"open({str(marker)!r}, 'w')"),
], ids=["os.system", "subprocess.call", "builtins.eval"])
def test_malicious_ckpt_is_refused_and_never_runs(tmp_path, make):
  marker = tmp_path / "marker"
  path = _evil_ckpt(tmp_path, make(marker))
  with pytest.raises(safe_pickle.RefusedGlobalError) as info:
    lightning_ckpt.read_checkpoint(path)
  message = str(info.value)
  assert isinstance(info.value, UserError) and "\n" not in message
  assert message.startswith(
      f"{path}: refusing to load the checkpoint (archive/data.pkl): it calls global "), message
  assert not marker.exists()


def test_malicious_ckpt_on_the_command_line_exits_2(tmp_path):
  marker, out = tmp_path / "marker", tmp_path / "out"
  path = _evil_ckpt(tmp_path, _Payload(os.system, f"touch {marker}"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  run = subprocess.run(
      [sys.executable, "-m", "vqddm_jax.convert", "taming_vqgan", f"--ckpt={path}", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr, run.stderr
  assert run.stderr.strip().splitlines()[-1] == (
      f"{cli.PROG}: error: {path}: refusing to load the checkpoint (archive/data.pkl): it calls global "
      f"{os.system.__module__}.system, which could run code; this reader never imports or calls a global "
      "outside its table")
  assert not marker.exists() and not out.exists()


def test_objects_of_unknown_classes_are_read_as_data_never_imported(tmp_path, monkeypatch):
  """A callback object of a class whose module would run code on import: the file reads, the module is
  never imported, and the weights come out."""
  marker, name = tmp_path / "imported", "vqddm_test_callbacks_module"
  (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Callback:\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  fake = type(sys)(name)
  fake.Callback = type("Callback", (), {"__module__": name})
  monkeypatch.setitem(sys.modules, name, fake)
  obj = fake.Callback()
  obj.__dict__.update(monitor="val/rec_loss", seen={1, 2}, blob=b"\x00\x01")
  ckpt = {"callbacks": {fake.Callback: obj}, "state_dict": {}, "epoch": 2}
  path = tmp_path / "ok.ckpt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(ckpt, protocol=2))
  monkeypatch.delitem(sys.modules, name)
  weights, info = lightning_ckpt.read_checkpoint(str(path))
  assert weights == {} and info == {"epoch": 2, "other_entries": ["callbacks"]}
  assert not marker.exists() and name not in sys.modules


def _rgb_folder(root: pathlib.Path, num: int = 96) -> None:
  """Smooth random 16 px RGB images (colour ramps and a bright square), PNG files in one folder."""
  from PIL import Image
  rng = np.random.default_rng(0)
  root.mkdir(parents=True)
  ramp = np.linspace(0.0, 1.0, 16)
  for i in range(num):
    a, b = rng.uniform(0, 255, (2, 3))
    img = a + (b - a) * ramp[None, :, None] * ramp[:, None, None]
    y, x = rng.integers(0, 10, 2)
    img[y:y + 6, x:x + 6] = rng.uniform(0, 255, 3)
    Image.fromarray(img.astype(np.uint8)).save(root / f"{i:03d}.png")


def test_stage1_imported_from_a_converted_tokenizer_then_refit_reports(taming_dir, tmp_path):
  """`vqvae_train.init_from` with 0 steps: stage 1 is the converted tokenizer (checkpoint 0, the same codes as
  the converted model); ReFiT rebuilds its codebook and writes its usage / perplexity / MSE report unchanged;
  a config that describes another model is refused naming the fields."""
  from conftest import load_config
  from vqddm_jax import restore, stages
  from vqddm_jax.workdir import Workdir
  out, _ = taming_dir
  _rgb_folder(tmp_path / "images")
  config = load_config("configs/mnist.py:tiny")
  config.data.update(source="image_folder", image_folder=str(tmp_path / "images"), channels=3, image_size=16,
                     resize="center_crop", holdout_fraction=0.25)
  fields, params = imported.load_vqvae(out)
  config.vqvae.update(**{k: v for k, v in fields.items()})
  config.vqvae_train.update(init_from=str(out), num_steps=0, codebook_loss="taming_legacy", batch_size=16)
  config.refit.update(num_codes=8, num_features=256, batch_size=16, num_steps=2)
  workdir = Workdir(tmp_path / "w")
  bad = config.copy_and_resolve_references()
  bad.vqvae.z_channels = 16
  with pytest.raises(MismatchError, match=r"config.vqvae.z_channels = 16 \(the tokenizer's: 8\)"):
    stages.run_stage(stages.REGISTRY[0], bad, workdir)
  for stage in stages.REGISTRY[:2]:  # train_vqvae (imported), refit
    assert stages.run_stage(stage, config, workdir).completed
  tokenizer = restore.restore_vqvae(config, workdir, "vqvae")
  assert tokenizer.step == 0
  for a, b in zip(jax.tree_util.tree_leaves(tokenizer.params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  report = (workdir.refit.root / "report.json").read_text()
  for key in ("usage", "perplexity", "mse"):
    assert key in report

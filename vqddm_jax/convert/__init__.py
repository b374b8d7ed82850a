"""Torch-free converters of peer checkpoints into this project's models.

- `lightning_ckpt`: reads the tensors of a PyTorch Lightning `.ckpt` or a state dict, never importing or
  running the classes the pickle names (the safety argument is in its docstring);
- `taming`: taming-transformers' VQGAN -> `models.vqvae.VQVAE`; `authors_unet`: the VQ-DDM authors' denoiser
  -> `models.unet.UNet`; `mapping`: the name maps' layouts and the every-name check;
- `imported`: the converted folder (Orbax params, model.json, conversion.json) and its loaders;
- `python -m vqddm_jax.convert taming_vqgan|authors_unet --ckpt=FILE --out=DIR`: the command line.
"""

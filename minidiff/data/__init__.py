"""Files minidiff needs at run time, installed with the package (package data).

- `configs/<family>/`: the official diffusers config files (model_index.json, unet/, vae/,
  text_encoder/, scheduler/, ...) of the checkpoints `from_single_file` and the benchmarks build;
  no weights. Where each came from: configs/README.md.
- `clip-tokenizer/`: OpenAI CLIP's byte-level BPE vocabulary and merges in the diffusers
  `tokenizer/` layout, with the script that converted them. Provenance: clip-tokenizer/README.md.

These paths are found from this file, inside the installed package, never from a repository
root: an installed (non-editable) minidiff finds them the same way. Model folders such as the
shapes model (`weights/shapes` in the repository) are not package data; they are addressed by
path like any other model folder.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent
CONFIGS = DATA / "configs"
CLIP_TOKENIZER = DATA / "clip-tokenizer"


def config_folder(name: str) -> Path:
    """The folder of one shipped config family, e.g. `config_folder("stable-diffusion-v1-5")`."""
    folder = CONFIGS / name
    if not folder.is_dir():
        known = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
        raise FileNotFoundError(f"minidiff ships no config family {name!r}; it has {', '.join(known)}.")
    return folder

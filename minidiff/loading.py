"""Checkpoint loading and saving in the official Hugging Face layouts.

Everything minidiff reads from disk goes through this file, so that every model loads the same
way and every mistake is reported the same way:

    resolve_folder   local folder, or a hub repo id downloaded with only the files we need
    read_json        config.json / scheduler_config.json / model_index.json
    weight_files     the safetensors file(s) of a component: single file, sharded with an
                     `.index.json`, and variants (`diffusion_pytorch_model.fp16.safetensors`)
    read_state_dict  tensors from those files, with a clear error for a corrupt file
    load_strict      `load_state_dict(strict=True)` whose error lists missing, unexpected and
                     mis-shaped keys in one readable message
    save_weights     the same layout back (optionally sharded), readable by diffusers/transformers
    config_from_dict dict -> config dataclass; unknown keys are ignored with one warning
    build_loaded     the tail of every loader: meta-device build, dtype cast, load_strict,
                     buffers, eval (`from_pretrained` here, `from_single_file` in single_file.py)
    PretrainedMixin  `from_pretrained` / `save_pretrained` for every minidiff model

This file imports none of its users: single_file.py imports it (and adds `from_single_file`
through its own `SingleFileMixin`), never the other way round.

Layout facts (diffusers / transformers as of 2025):
    <repo>/model_index.json                          pipeline: {"unet": ["diffusers", "UNet2DConditionModel"], ...}
    <repo>/unet/config.json                          model hyper-parameters
    <repo>/unet/diffusion_pytorch_model.safetensors  diffusers weights ("model.safetensors" for transformers)
    <repo>/unet/diffusion_pytorch_model.fp16.safetensors                 a "variant"
    <repo>/unet/diffusion_pytorch_model.safetensors.index.json           shards: {"weight_map": {key: file}}
    <repo>/scheduler/scheduler_config.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minidiff.errors import InputError

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"


# ----------------------------------------------------------------------------------------------
# Finding files


def _looks_like_local_path(name: str) -> bool:
    # A repo id is "owner/name" (or a bare "name"). Anything with a leading "/", ".", "~", a
    # backslash or more than one "/" can only be a path on disk.
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.exists(name)
    )


def resolve_folder(
    path_or_repo_id: str | os.PathLike,
    subfolder: str | None = None,
    allow_patterns: Iterable[str] | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
) -> Path:
    """Return the local folder holding `subfolder` of a checkpoint.

    A local folder is used as it is. Otherwise `path_or_repo_id` is taken as a Hugging Face hub
    repo id and downloaded with `snapshot_download`, restricted to `allow_patterns` (relative to
    `subfolder`), so that asking for a UNet does not fetch the whole pipeline.
    `local_files_only=True`, or the environment variable HF_HUB_OFFLINE=1, forbids the network:
    only the local hub cache is consulted.
    """
    name = os.fspath(path_or_repo_id)
    local = Path(name).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise FileNotFoundError(
                f"The checkpoint folder {str(local)!r} has no subfolder {subfolder!r}. "
                f"It contains: {sorted(p.name for p in local.iterdir())}."
            )
        return folder
    if local.is_file():
        raise FileNotFoundError(
            f"{name!r} is a file, but a checkpoint folder was expected (the diffusers layout: "
            "a folder with config.json and *.safetensors). For a single .safetensors/.ckpt "
            "file use `from_single_file`."
        )
    if _looks_like_local_path(name):
        raise FileNotFoundError(
            f"No checkpoint folder at {name!r}: the path does not exist. Check the spelling, "
            "or pass a Hugging Face repo id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )

    # Imported here, not at the top: only a hub id needs it, and the hub client takes ~0.2 s to
    # import that loading a local folder never pays.
    from huggingface_hub import snapshot_download

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}
    patterns = None
    if allow_patterns is not None:
        prefix = f"{subfolder}/" if subfolder else ""
        patterns = [prefix + p for p in allow_patterns]
    try:
        root = snapshot_download(
            name, allow_patterns=patterns, local_files_only=local_files_only, revision=revision
        )
    except Exception as err:  # the hub raises many types; a user needs one sentence
        how = "it is not in the local hub cache" if local_files_only else f"{type(err).__name__}: {err}"
        raise FileNotFoundError(
            f"{name!r} is neither a local folder nor a hub repo that could be fetched ({how})."
        ) from err
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"The hub repo {name!r} has no subfolder {subfolder!r}.")
    return folder


def read_json(folder: str | os.PathLike, name: str) -> dict:
    """Read `folder/name` (config.json, scheduler_config.json, model_index.json)."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"Expected {name} in {str(folder)!r}, but there is no such file.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise InputError(f"{str(path)!r} is not valid JSON ({err}).") from err


def write_json(data: dict, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _with_variant(filename: str, variant: str | None) -> str:
    # diffusers and transformers insert the variant before the last extension:
    # "diffusion_pytorch_model.safetensors"        -> "diffusion_pytorch_model.fp16.safetensors"
    # "diffusion_pytorch_model.safetensors.index.json" -> "diffusion_pytorch_model.safetensors.index.fp16.json"
    if not variant:
        return filename
    head, _, ext = filename.rpartition(".")
    return f"{head}.{variant}.{ext}"


def weight_files(folder: str | os.PathLike, weights_name: str, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of one component, in load order.

    `weights_name` is the single-file name, e.g. "diffusion_pytorch_model.safetensors" or
    "model.safetensors". A sharded checkpoint replaces the single file with
    "<stem>.safetensors.index.json", whose `weight_map` names each shard.
    """
    folder = Path(folder)
    single = folder / _with_variant(weights_name, variant)
    index = folder / _with_variant(weights_name.replace(".safetensors", SAFETENSORS_INDEX_SUFFIX), variant)
    if variant and not index.is_file():
        # Some older uploads name a sharded variant "<stem>.fp16.safetensors.index.json".
        legacy = folder / single.name.replace(".safetensors", SAFETENSORS_INDEX_SUFFIX)
        index = legacy if legacy.is_file() else index
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(folder, index.name).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{str(index)!r} has no 'weight_map' dictionary; it is not a shard index.")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"The shard index {index.name} in {str(folder)!r} names files that are missing: {missing}.")
        return [folder / s for s in shards]
    present = sorted(p.name for p in folder.glob("*.safetensors*"))
    hint = f" It has: {present}." if present else " It has no .safetensors file at all."
    if variant and not present:
        hint += " (Is the variant right?)"
    raise FileNotFoundError(f"Expected {single.name} (or the shard index {index.name}) in {str(folder)!r}.{hint}")


def read_state_dict(files: Iterable[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Read and merge the tensors of safetensors files (all on the CPU)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Weight file {str(path)!r} does not exist.")
        try:
            part = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises SafetensorError / OSError for bad headers
            raise InputError(
                f"{str(path)!r} is not a readable safetensors file ({err}). It may be truncated "
                "(an interrupted download) or another format (a pickled .ckpt/.bin); re-download it."
            ) from err
        duplicated = state.keys() & part.keys()
        if duplicated:
            raise InputError(f"Tensors {sorted(duplicated)[:5]} appear in more than one shard (last seen in {path.name}).")
        state.update(part)
    return state


# ----------------------------------------------------------------------------------------------
# Strict loading


def _short_list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n    {shown}{more}"


def check_state_dict(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys, if any."""
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    mis_shaped = {
        k: (tuple(state_dict[k].shape), tuple(expected[k]))
        for k in expected.keys() & state_dict.keys()
        if tuple(state_dict[k].shape) != tuple(expected[k])
    }
    if not (missing or unexpected or mis_shaped):
        return
    parts = [f"The weights in {source} do not fit this model (is it the right model family and size?)."]
    if missing:
        parts.append(f"  {len(missing)} missing key(s), which the model needs but the file lacks:{_short_list(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected key(s), which the file has but the model does not:{_short_list(unexpected)}")
    if mis_shaped:
        lines = [f"{k}: file {s} vs model {m}" for k, (s, m) in mis_shaped.items()]
        parts.append(f"  {len(mis_shaped)} key(s) with the wrong shape:{_short_list(lines)}")
    if any(k.endswith(".absmax") for k in unexpected):
        parts.append("  The file holds NF4-quantised layers (keys ending in '.absmax'): load it with "
                     "minidiff.memory.load_quantized(model, path) instead.")
    raise InputError("\n".join(parts))


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "the checkpoint") -> nn.Module:
    """`model.load_state_dict(state_dict, strict=True)` with a readable error first."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state_dict, source)
    # assign=True keeps the file's tensors (and their dtype) instead of copying into the
    # model's freshly initialised ones: loading costs no second copy of the weights.
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def save_weights(
    state_dict: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    weights_name: str,
    variant: str | None = None,
    max_shard_size: int | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors as one safetensors file, or as shards plus an index when the total size
    exceeds `max_shard_size` bytes. Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous tensors that share no storage.
    shared = _shared_ptrs(state_dict)
    tensors = {k: (v.detach().clone() if v.data_ptr() in shared else v.detach()).contiguous()
               for k, v in state_dict.items()}
    metadata = {"format": "pt", **(metadata or {})}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        path = folder / _with_variant(weights_name, variant)
        save_file(tensors, str(path), metadata=metadata)
        return [path]
    # Greedy sharding in key order, like diffusers/transformers: "<stem>-00001-of-00003.safetensors".
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += n
    stem = _with_variant(weights_name, variant).removesuffix(".safetensors")
    written, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=metadata)
        written.append(folder / name)
        weight_map.update({k: name for k in shard})
    index_name = _with_variant(weights_name.replace(".safetensors", SAFETENSORS_INDEX_SUFFIX), variant)
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / index_name)
    return written


def _shared_ptrs(state_dict: dict[str, torch.Tensor]) -> set[int]:
    seen, shared = set(), set()
    for v in state_dict.values():
        p = v.data_ptr()
        (shared if p in seen else seen).add(p)
    return shared


# ----------------------------------------------------------------------------------------------
# Configs

_warned_keys: set[tuple[str, str]] = set()


def config_from_dict(config_cls: type, config: dict, ignore: Iterable[str] = ()) -> Any:
    """Build a config dataclass from a JSON dict.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) and keys in `ignore`
    (bookkeeping that transformers writes into every config) are dropped silently. Any other key
    the dataclass does not know is dropped with one warning per class, as diffusers does.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    ignore = set(ignore)
    known = {k: v for k, v in config.items() if k in names}
    unknown = sorted(k for k in config if k not in names and not k.startswith("_") and k not in ignore)
    fresh = [k for k in unknown if (config_cls.__name__, k) not in _warned_keys]
    if fresh:
        _warned_keys.update((config_cls.__name__, k) for k in fresh)
        warnings.warn(
            f"{config_cls.__name__}: ignoring config keys minidiff does not use: {fresh}.",
            stacklevel=3,
        )
    return config_cls(**known)


def refuse_pickled(use_safetensors: bool | None) -> None:
    """diffusers' `use_safetensors` argument: True or None are what minidiff does anyway."""
    if use_safetensors is False:
        raise InputError("minidiff reads only .safetensors weights (no pickled .bin/.ckpt); "
                         "drop use_safetensors=False.")


# ----------------------------------------------------------------------------------------------
# The dtype a model loads in


def resolve_dtype(torch_dtype, default: str, config: dict, state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The dtype `from_pretrained(..., torch_dtype=...)` loads in; None keeps each tensor's own.

    The one rule, as the two reference libraries apply it (diffusers 0.42, transformers 5.24):
        a torch.dtype (or its name)   that dtype
        "auto"                        the config's "dtype" (or older "torch_dtype") entry, else
                                      the dtype of the first floating tensor in the file
        None                          the library's default: diffusers models (UNet, VAE, ...)
                                      load float32 whatever the file holds (`default="float32"`);
                                      transformers 5 models (CLIP) load as "auto" (`default="auto"`)
    """
    if torch_dtype is None:
        torch_dtype = default
    if torch_dtype == "auto":
        named = config.get("dtype") or config.get("torch_dtype")
        if named:
            return getattr(torch, named)
        return next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if isinstance(torch_dtype, str):
        if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
            raise InputError(f"torch_dtype={torch_dtype!r} is not a torch dtype; use e.g. torch.float16 or \"auto\".")
        torch_dtype = getattr(torch, torch_dtype)
    return torch_dtype


# ----------------------------------------------------------------------------------------------
# The last steps of every loader


def build_loaded(cls, config: dict | Any, state: dict[str, torch.Tensor], source: str,
                 dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Build `cls` from `config` and give it the weights `state` (already in `cls`'s key names):
    the tail shared by `from_pretrained` (below) and `from_single_file` (minidiff/single_file.py).

        1. cast the floating tensors to `dtype` (None keeps each tensor's own; integer and bool
           buffers are never cast)
        2. build on the meta device: no memory and no time spent on random initial weights that
           the checkpoint replaces anyway
        3. `load_strict`: every key present, none extra, every shape right, else one readable
           error naming `source`; the loaded tensors are assigned, not copied
        4. recreate the buffers the checkpoint does not hold (still on the meta device)
        5. move to `device` if given, and `eval()` (no dropout; what diffusers returns as well)
    """
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = cls.from_config(config)
    load_strict(model, state, source=source)
    model._init_non_persistent_buffers()
    if device is not None:
        model.to(device)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained shared by every model


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` in the official layout.

    A subclass sets:
        config_class   a dataclass whose field names are the config.json keys
        weights_name   "diffusion_pytorch_model.safetensors" (diffusers) or "model.safetensors"
        config_extras  keys written into config.json beside the fields (`_class_name`, ...)
        config_ignore  config.json keys dropped silently on load
        default_dtype  what `torch_dtype=None` means: "float32" (diffusers) or "auto" (transformers)
    and takes the config object as its only constructor argument.
    """

    config_class: type
    weights_name: str = "diffusion_pytorch_model.safetensors"
    config_name: str = "config.json"
    config_ignore: tuple[str, ...] = ()
    default_dtype: str = "float32"

    def config_extras(self) -> dict:
        return {"_class_name": type(self).__name__}

    @classmethod
    def from_config(cls, config: dict | Any):
        if isinstance(config, dict):
            config = config_from_dict(cls.config_class, config, cls.config_ignore)
        return cls(config)

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook between reading a checkpoint and loading it: a model whose files come in several
        generations (e.g. CLIP with or without the `text_model.` prefix) renames keys here."""
        return state

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        use_safetensors: bool | None = None,
    ):
        """Load a component folder (or `subfolder` of a pipeline folder or hub repo).
        `dtype=` is transformers 5's name for `torch_dtype`; the dtype rule is `resolve_dtype`'s.
        `use_safetensors` is accepted for diffusers code: minidiff reads safetensors only."""
        refuse_pickled(use_safetensors)
        torch_dtype = dtype if torch_dtype is None else torch_dtype
        stem = cls.weights_name.removesuffix(".safetensors")
        folder = resolve_folder(
            path_or_repo_id, subfolder,
            allow_patterns=[cls.config_name, f"{stem}*.safetensors", f"{stem}*.safetensors.index.json"],
            local_files_only=local_files_only, revision=revision,
        )
        config = read_json(folder, cls.config_name)
        files = weight_files(folder, cls.weights_name, variant)
        state = cls.convert_state_dict(read_state_dict(files))
        torch_dtype = resolve_dtype(torch_dtype, cls.default_dtype, config, state)
        source = ", ".join(repr(str(f)) for f in files)
        return build_loaded(cls, config, state, source, dtype=torch_dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first parameter, as diffusers' and transformers' models report it."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _init_non_persistent_buffers(self) -> None:
        """Buffers that are not in the checkpoint (e.g. CLIP's position ids) are still on the
        meta device after `from_pretrained`; a model with such buffers recreates them here."""
        for name, buf in self.named_buffers():
            if buf.is_meta:
                raise RuntimeError(f"{type(self).__name__} left buffer {name!r} uninitialised after loading.")

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        variant: str | None = None,
        max_shard_size: int | None = None,
    ) -> None:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        config = {**dataclasses.asdict(self.config), **self.config_extras()}
        write_json(config, folder / self.config_name)
        save_weights(self.state_dict(), folder, self.weights_name, variant=variant, max_shard_size=max_shard_size)

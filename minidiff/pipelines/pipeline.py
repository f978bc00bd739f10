"""`DiffusionPipeline`: what every minidiff pipeline shares with diffusers' pipelines.

A pipeline is a handful of components (models, a tokenizer, schedulers) plus a sampling loop.
The loop lives in each subclass (text_to_image.py, diffedit.py); this file holds the plumbing a
diffusers user reaches for, with diffusers' names and arguments:

    DiffusionPipeline.from_pretrained(path)   the class named by model_index.json's _class_name
    Pipeline.from_pretrained(path, torch_dtype=..., quantization_config=..., scheduler=...)
    pipe.components                           {name: component}, so Pipeline(**pipe.components) works
    pipe.save_pretrained(folder)              model_index.json + one subfolder per component
    pipe.recommended_settings                 the folder's recommended_settings.json, {} without one
                                              (minidiff's own: the methods keep diffusers' defaults;
                                              settings.py)
    pipe.to(device, dtype), pipe.device, pipe.dtype
    pipe.enable_model_cpu_offload() ...       thin calls into minidiff/memory (offload, slicing)

The component names are the subclass's `__init__` parameters, so the signature is the one list
of components (as in diffusers). A component is loaded by the class model_index.json names, mapped
to minidiff's own in `component_class`.

Folder layout (diffusers):
    model_index.json   {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], ...}
    unet/ vae/ text_encoder/ tokenizer/ scheduler/ ...
    recommended_settings.json   optional, minidiff's (settings.py); diffusers ignores it
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minidiff.errors import InputError, NonFiniteError
from minidiff.image_processor import CLIPImageProcessor
from minidiff.loading import read_json, refuse_pickled, resolve_folder, write_json
from minidiff.memory.nf4 import NF4_LAYERS, load_quantized, save_quantized
from minidiff.models.attention import set_attention_backend, set_attention_slice
from minidiff.models.clip import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
)
from minidiff.models.prior import PriorTransformer
from minidiff.models.unet import UNet2DConditionModel
from minidiff.models.vae import AutoencoderKL
from minidiff.models.vq import VQModel
from minidiff.pipelines.settings import (
    recommended_settings,
    write_recommended_settings,
)
from minidiff.schedulers.ddim import DDIMInverseScheduler, DDIMScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.unclip import UnCLIPScheduler
from minidiff.tokenizer import CLIPTokenizer

# Components diffusers' SD pipelines take that minidiff does not have. A folder may list them; a
# caller may pass them as None (`safety_checker=None`, as diffusers' docs do), nothing else.
ABSENT_COMPONENTS = ("safety_checker", "feature_extractor")


def component_class(class_name: str) -> tuple[type, str]:
    """model_index.json's class name -> (minidiff class, the library name written back on save)."""
    known = {
        "UNet2DConditionModel": (UNet2DConditionModel, "diffusers"),
        "AutoencoderKL": (AutoencoderKL, "diffusers"),
        "VQModel": (VQModel, "diffusers"),
        "DDIMScheduler": (DDIMScheduler, "diffusers"),
        "DDIMInverseScheduler": (DDIMInverseScheduler, "diffusers"),
        "DDPMScheduler": (DDPMScheduler, "diffusers"),
        "UnCLIPScheduler": (UnCLIPScheduler, "diffusers"),
        "PriorTransformer": (PriorTransformer, "diffusers"),
        "CLIPTextModel": (CLIPTextModel, "transformers"),
        "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, "transformers"),
        "CLIPVisionModelWithProjection": (CLIPVisionModelWithProjection, "transformers"),
        "CLIPTokenizer": (CLIPTokenizer, "transformers"),
        "CLIPTokenizerFast": (CLIPTokenizer, "transformers"),
        # transformers 5 names its PIL implementation CLIPImageProcessorPil in what it saves.
        "CLIPImageProcessor": (CLIPImageProcessor, "transformers"),
        "CLIPImageProcessorPil": (CLIPImageProcessor, "transformers"),
    }
    if class_name in known:
        return known[class_name]
    if class_name.endswith("Scheduler"):
        # SD 1.5 ships a PNDMScheduler config (others: Euler, DPM-Solver, ...). minidiff's loops are
        # DDIM's, and a scheduler config is betas + options, which DDIM reads as they are.
        return DDIMScheduler, "diffusers"
    raise InputError(f"model_index.json names a component class {class_name!r} that minidiff does not have; "
                     f"it has {sorted(known)} (and reads any *Scheduler config as DDIM).")


# _class_name in model_index.json -> (module, class) of the minidiff pipeline that reads it. Names,
# not imports: the pipelines import this base class, so importing them here would close a circle;
# a class is imported only when a folder asks for it (as minidiff/__init__.py does for every name).
PIPELINE_CLASSES = {
    "StableDiffusionPipeline": ("minidiff.pipelines.text_to_image", "StableDiffusionPipeline"),
    "StableDiffusionDiffEditPipeline": ("minidiff.pipelines.diffedit", "DiffEditPipeline"),
    "DiffEditPipeline": ("minidiff.pipelines.diffedit", "DiffEditPipeline"),
    "KandinskyV22PriorPipeline": ("minidiff.pipelines.kandinsky", "KandinskyV22PriorPipeline"),
    "KandinskyPriorPipeline": ("minidiff.pipelines.kandinsky", "KandinskyPriorPipeline"),
    "KandinskyV22Pipeline": ("minidiff.pipelines.kandinsky_decoder", "KandinskyV22Pipeline"),
    "KandinskyV22CombinedPipeline": ("minidiff.pipelines.kandinsky_decoder", "KandinskyV22CombinedPipeline"),
}


def pipeline_class(name: str) -> type:
    """The minidiff pipeline class for a model_index.json `_class_name` (one of PIPELINE_CLASSES)."""
    module, attribute = PIPELINE_CLASSES[name]
    return getattr(importlib.import_module(module), attribute)


def _nf4_layers(module: nn.Module) -> bool:
    return any(isinstance(m, NF4_LAYERS) for m in module.modules())


class DiffusionPipeline:
    # model_index.json's _class_name for this class (diffusers' name, so diffusers loads it back).
    _diffusers_class_name: str = "DiffusionPipeline"

    # Where the sampling loop runs while CPU offload is installed: the accelerator the weights
    # visit to compute (diffusers' `_execution_device`). The offload hooks set it on install and
    # reset it to None on removal (minidiff/memory/offload/install.py); None: no offload, the loop
    # runs where the weights are. Read through `device`.
    execution_device: torch.device | None = None

    # ------------------------------------------------------------------------------------------
    # Components

    @classmethod
    def component_names(cls) -> list[str]:
        """The `__init__` parameters that are components (everything but flags such as
        requires_safety_checker)."""
        params = inspect.signature(cls.__init__).parameters
        return [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
                and n != "requires_safety_checker"]

    @property
    def components(self) -> dict[str, Any]:
        """{name: component} for every `__init__` component, so `OtherPipeline(**pipe.components)`
        builds a second pipeline on the same weights (no copy)."""
        return {name: getattr(self, name, None) for name in self.component_names()}

    def _model_components(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self.components.items() if isinstance(v, nn.Module)}

    # ------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, variant: str | None = None,
                        local_files_only: bool | None = None, quantization_config=None,
                        use_safetensors: bool | None = None, **components):
        """Load a pipeline folder or hub repo. On `DiffusionPipeline` itself the class comes from
        model_index.json's _class_name. Components passed by name (`scheduler=...`, or
        `safety_checker=None`) are used instead of loading them. `torch_dtype=None` loads each
        component in its library's default (see loading.resolve_dtype). The folder's
        recommended_settings.json, if it has one (for a hub id: if the snapshot has it, as its
        *.json files are fetched), becomes `pipe.recommended_settings`."""
        refuse_pickled(use_safetensors)
        root = resolve_folder(pretrained_model_name_or_path, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                              local_files_only=local_files_only)
        index = read_json(root, "model_index.json")
        if cls is DiffusionPipeline:
            name = index.get("_class_name")
            if name not in PIPELINE_CLASSES:
                raise InputError(f"model_index.json in {str(root)!r} names the pipeline {name!r}; minidiff has "
                                 f"{sorted(PIPELINE_CLASSES)}.")
            cls = pipeline_class(name)

        wanted = cls.component_names()
        unknown = sorted(set(components) - set(wanted) - set(ABSENT_COMPONENTS))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unknown component(s) {unknown}; its components "
                            f"are {wanted}.")
        parts: dict[str, Any] = {}
        for name in wanted:
            if name in components:
                parts[name] = components[name]
                continue
            spec = index.get(name)
            if not spec or spec[1] is None:
                if inspect.signature(cls.__init__).parameters[name].default is inspect.Parameter.empty:
                    raise InputError(f"model_index.json in {str(root)!r} has no {name!r} component, which "
                                     f"{cls.__name__} needs; it lists {sorted(k for k in index if not k.startswith('_'))}.")
                continue
            quantize = quantization_config is not None and quantization_config.wants(name)
            parts[name] = cls._load_component(root, name, spec[1], torch_dtype, variant,
                                              quantization_config if quantize else None)
        pipe = cls(**parts)
        pipe.recommended_settings = recommended_settings(root)
        return pipe.to(device) if device is not None else pipe

    @staticmethod
    def _load_component(root: Path, name: str, class_name: str, torch_dtype, variant, quantization_config):
        component_cls, _ = component_class(class_name)
        if not issubclass(component_cls, nn.Module):  # a tokenizer or a scheduler: no weights, no dtype
            return component_cls.from_pretrained(root, subfolder=name)
        config = read_json(root / name, component_cls.config_name)
        saved_quantization = config.get("quantization_config")
        if saved_quantization and saved_quantization.get("quant_method") == "minidiff_nf4":
            # Written by save_pretrained of a quantized pipeline: the NF4 layers come back as they were.
            with torch.device("meta"):
                model = component_cls.from_config(config)
            return load_quantized(model, root / name / component_cls.weights_name).eval()
        model = component_cls.from_pretrained(root, subfolder=name, torch_dtype=torch_dtype, variant=variant)
        if quantization_config is not None:
            quantization_config.quantize(model)
            model._minidiff_quantization = quantization_config
        return model

    def save_pretrained(self, save_directory: str | os.PathLike, variant: str | None = None) -> None:
        """Write the diffusers layout: model_index.json and one folder per component, which
        diffusers' `from_pretrained` loads back (NF4-quantized components load in minidiff only),
        and recommended_settings.json when `recommended_settings` is not empty.
        The folder is written next to its destination and moved into place when complete, and an
        existing folder with files in it is refused: nothing of yours is overwritten."""
        target = Path(save_directory)
        if target.is_file() or (target.is_dir() and any(target.iterdir())):
            raise FileExistsError(f"{str(target)!r} already exists and is not empty; save into a new folder.")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            index: dict[str, Any] = {"_class_name": self._diffusers_class_name}
            for name, component in self.components.items():
                if component is None:
                    index[name] = [None, None]
                    continue
                _, library = component_class(type(component).__name__)
                index[name] = [library, type(component).__name__]
                self._save_component(component, staging / name, variant)
            if "requires_safety_checker" in inspect.signature(type(self).__init__).parameters:  # SD's folders
                for name in ABSENT_COMPONENTS:
                    index.setdefault(name, [None, None])
                index["requires_safety_checker"] = False
            write_json(index, staging / "model_index.json")
            if self.recommended_settings:
                write_recommended_settings(self.recommended_settings, staging)
            if target.is_dir():
                target.rmdir()  # empty (checked above)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @staticmethod
    def _save_component(component, folder: Path, variant: str | None) -> None:
        if not (isinstance(component, nn.Module) and _nf4_layers(component)):
            if isinstance(component, nn.Module):
                component.save_pretrained(folder, variant=variant)
            else:
                component.save_pretrained(folder)
            return
        component.save_pretrained(folder)  # config.json (the weights file is replaced below)
        config = read_json(folder, component.config_name)
        quantization = getattr(component, "_minidiff_quantization", None)
        config["quantization_config"] = quantization.to_json() if quantization else {"quant_method": "minidiff_nf4"}
        write_json(config, folder / component.config_name)
        save_quantized(component, folder / component.weights_name)

    # ------------------------------------------------------------------------------------------
    # Device and dtype

    def to(self, *args, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """`pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)` or keywords."""
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for module in self._model_components().values():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the sampling loop runs: `execution_device` while CPU offload is installed (the
        weights live on the CPU between calls), else where the first component's weights are."""
        if self.execution_device is not None:
            return self.execution_device
        return next(next(iter(self._model_components().values())).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(next(iter(self._model_components().values())).parameters()).dtype

    # ------------------------------------------------------------------------------------------
    # Memory: thin calls into minidiff/memory and the models' own switches. minidiff.memory is
    # imported in the methods: it imports torch._dynamo (~2 s), which only its users should pay.

    @staticmethod
    def _accelerator(device, gpu_id: int | None = None) -> str | torch.device:
        # diffusers picks the accelerator when `device` is None and refuses without one. minidiff
        # offloads to the CPU instead (a rehearsal that saves nothing; memory/offload warns), so a
        # diffusers snippet still runs, and can be traced, on a CPU-only machine.
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return device if gpu_id is None else f"{torch.device(device).type}:{gpu_id}"

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """One whole component on the accelerator at a time (minidiff.memory.enable_model_cpu_offload)."""
        from minidiff.memory.offload import enable_model_cpu_offload

        return enable_model_cpu_offload(self, self._accelerator(device, gpu_id))

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None):
        """Each weight-holding module visits the accelerator just for its own forward."""
        from minidiff.memory.offload import enable_sequential_cpu_offload

        return enable_sequential_cpu_offload(self, self._accelerator(device, gpu_id))

    def enable_group_offload(self, onload_device: str | torch.device, offload_device: str | torch.device = "cpu",
                             offload_type: str = "block_level", num_blocks_per_group: int | None = None,
                             non_blocking: bool = False, use_stream: bool = False, **unsupported):
        """Groups of blocks ("block_level", `num_blocks_per_group` each) or single leaf modules
        ("leaf_level") on `onload_device` only while they compute."""
        from minidiff.memory.offload import (
            apply_group_offloading,
            enable_sequential_cpu_offload,
        )

        if unsupported:
            raise InputError(f"enable_group_offload: {sorted(unsupported)} are not supported by minidiff's group offload.")
        if torch.device(offload_device).type != "cpu":
            raise InputError(f"offload_device must be the CPU, got {offload_device!r}.")
        if offload_type == "leaf_level":
            # One group per leaf module is what sequential offload does; with use_stream the
            # prefetching group schedule is needed instead, one module per group.
            if not use_stream:
                return enable_sequential_cpu_offload(self, onload_device)
            num_blocks_per_group = 1
        elif offload_type != "block_level":
            raise InputError(f"offload_type must be 'block_level' or 'leaf_level', got {offload_type!r}.")
        elif num_blocks_per_group is None:
            raise InputError("offload_type='block_level' needs num_blocks_per_group (e.g. 1), as in diffusers.")
        return apply_group_offloading(self, onload_device, num_blocks_per_group=num_blocks_per_group,
                                      use_stream=use_stream)

    def remove_all_hooks(self) -> None:
        """Undo any offload: every weight back where it was, the same Parameter objects."""
        from minidiff.memory.offload import remove_offload

        remove_offload(self)

    def reset_device_map(self) -> None:
        """diffusers' reset for a pipeline spread with device_map: hooks off, components on the CPU."""
        self.remove_all_hooks()
        self.to("cpu")

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Compute attention a slice of heads at a time ("auto": half the heads, "max": one)."""
        set_attention_slice(self.unet, slice_size)

    def disable_attention_slicing(self) -> None:
        self.enable_attention_slicing(None)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """minidiff has no xFormers. What it stands for, attention that never holds the whole score
        matrix, is minidiff's default backend "auto" (PyTorch SDPA's fused kernels, or minidiff's
        Triton flash kernel on CUDA): this selects "auto" (global, minidiff.set_attention_backend)
        and turns attention slicing off, as diffusers does when it switches to xFormers."""
        if attention_op is not None:
            raise InputError("attention_op is an xFormers operator; minidiff has no xFormers, pass none.")
        set_attention_backend("auto")
        self.disable_attention_slicing()

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Nothing to undo: "auto" is minidiff's default attention (see enable_...)."""

    def enable_vae_slicing(self) -> None:
        """Decode a batch of latents one image at a time (for large batches); same images."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images as overlapping tiles of the VAE's sample_size. Changes
        the images slightly (each tile is normalised on its own), and only above sample_size."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    # ------------------------------------------------------------------------------------------
    # A NaN stops the loop where it appears

    @staticmethod
    def check_finite(x: torch.Tensor, stage: str, step: int, total: int, t) -> None:
        """Raise NonFiniteError when `x` (the latents after a step of `stage`) holds NaN or inf.
        Without this a NaN flows through every later step and the VAE returns a black image."""
        if not torch.isfinite(x).all():
            raise NonFiniteError(
                f"The latents stopped being finite (NaN or inf) at step {step + 1} of {total} of {stage} "
                f"(t={int(t)}): the UNet's output was not finite. Its weights may hold NaN or inf (`minidiff check "
                f"MODEL` shows which component), or float16 overflowed (use float32 or bfloat16).")

    # ------------------------------------------------------------------------------------------
    # Progress bars

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable, desc: str | None = None):
        return tqdm(iterable, desc=desc, **getattr(self, "_progress_bar_config", {}))

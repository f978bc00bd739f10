"""Quantization at load time, as diffusers' `PipelineQuantizationConfig` spells it.

    from minidiff import DiffusionPipeline
    from minidiff.quantizers import PipelineQuantizationConfig

    config = PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=["unet", "text_encoder"],
    )
    pipe = DiffusionPipeline.from_pretrained("weights/shapes", quantization_config=config)

The fields are diffusers' (0.42); what runs is minidiff's own NF4 (minidiff/memory/nf4.py,
bit-exact with bitsandbytes' quantize_4bit): every nn.Linear of each named component becomes a
`LinearNF4`, as bitsandbytes' `Linear4bit` replaces every Linear under diffusers'
`BitsAndBytesConfig`. Only 4-bit NF4 is implemented; anything else is refused with a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from minidiff.errors import InputError

SUPPORTED_BACKENDS = ("bitsandbytes_4bit",)
# The quant_kwargs minidiff reads; the others bitsandbytes knows are refused rather than ignored.
KNOWN_KWARGS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype", "bnb_4bit_use_double_quant",
                "bnb_4bit_quant_storage", "llm_int8_skip_modules")
# What a saved component's config.json says about its quantization (read back by the pipeline loader).
QUANT_METHOD = "minidiff_nf4"


@dataclass
class PipelineQuantizationConfig:
    quant_backend: str = "bitsandbytes_4bit"
    quant_kwargs: dict = field(default_factory=dict)
    components_to_quantize: list[str] | str | None = None

    def __post_init__(self):
        if self.quant_backend not in SUPPORTED_BACKENDS:
            raise InputError(f"quant_backend={self.quant_backend!r} is not available in minidiff; it implements "
                             f"{SUPPORTED_BACKENDS} (NF4 weights, minidiff/memory/nf4.py).")
        unknown = sorted(set(self.quant_kwargs) - set(KNOWN_KWARGS))
        if unknown:
            raise InputError(f"quant_kwargs {unknown} are not supported; minidiff reads {list(KNOWN_KWARGS)}.")
        if self.quant_kwargs.get("load_in_4bit", True) is not True:
            raise InputError("quant_backend='bitsandbytes_4bit' needs load_in_4bit=True.")
        kind = self.quant_kwargs.get("bnb_4bit_quant_type", "nf4")
        if kind != "nf4":
            raise InputError(f"bnb_4bit_quant_type={kind!r} is not implemented; minidiff quantizes to 'nf4' only.")
        if isinstance(self.components_to_quantize, str):
            self.components_to_quantize = [self.components_to_quantize]

    @property
    def compute_dtype(self) -> torch.dtype | None:
        dtype = self.quant_kwargs.get("bnb_4bit_compute_dtype")
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype

    @property
    def double_quant(self) -> bool:
        return bool(self.quant_kwargs.get("bnb_4bit_use_double_quant", False))

    def wants(self, name: str) -> bool:
        """Is the pipeline component `name` to be quantized? (None: every model component.)"""
        return self.components_to_quantize is None or name in self.components_to_quantize

    def quantize(self, model: nn.Module) -> nn.Module:
        """Swap every nn.Linear of `model` (outside llm_int8_skip_modules) for a LinearNF4, in place."""
        from minidiff.memory.nf4 import quantize_model

        skip = tuple(self.quant_kwargs.get("llm_int8_skip_modules") or ())
        quantize_model(model, include="*", exclude=skip, double_quant=self.double_quant,
                       compute_dtype=self.compute_dtype)
        return model

    def to_json(self) -> dict:
        """The entry a quantized component's config.json carries."""
        kwargs = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                  for k, v in self.quant_kwargs.items()}
        return {"quant_method": QUANT_METHOD, **kwargs}

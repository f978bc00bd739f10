"""The Stable Diffusion 1.x / 2.x denoising UNet (diffusers' `UNet2DConditionModel`).

Given a noisy latent x_t (B, 4, H/8, W/8), the timestep t and the text encoder's hidden states
(B, 77, 768 or 1024), it predicts eps (or v, for SD 2.x-768-v) with the same shape as x_t.

    t -> sinusoidal code (320) -> MLP -> temb (1280), added inside every resnet
    conv_in                                     (B,  320, h,   w)
    down_blocks.0  CrossAttnDownBlock2D  320    2 x (resnet + transformer), stride-2 conv
    down_blocks.1  CrossAttnDownBlock2D  640    ... h/2
    down_blocks.2  CrossAttnDownBlock2D 1280    ... h/4
    down_blocks.3  DownBlock2D          1280    2 x resnet, no downsampling  (B, 1280, h/8, w/8)
    mid_block      resnet + transformer + resnet
    up_blocks.0    UpBlock2D            1280    3 x (concat skip, resnet), nearest x2 + conv
    up_blocks.1-3  CrossAttnUpBlock2D   1280, 640, 320: 3 x (concat skip, resnet + transformer)
    conv_norm_out -> SiLU -> conv_out           (B,    4, h,   w)

Every output of conv_in, of each down-path resnet/transformer pair and of each downsampler is
kept as a skip connection; the up path consumes them in reverse order, one per resnet
(Ronneberger et al. 2015, U-Net). Numbers above are SD 1.5; SD 2.x differs only in the head
counts, the text width (1024) and Linear instead of 1x1-conv proj_in/proj_out.

References: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
(the LDM UNet); Ho et al. 2020, DDPM, appendix B (resnets with the time embedding); diffusers'
`UNet2DConditionModel`, whose checkpoint keys the attribute names below reproduce exactly, so
`diffusion_pytorch_model.safetensors` loads with `load_state_dict(strict=True)`.

Only the five block types SD uses are implemented here, as plain classes. Config options that SD
1.x/2.x never change are accepted at their diffusers default and refused otherwise
(`UNSUPPORTED_UNLESS` below). Latent sizes must be divisible by 2**(number of downsamplers) (8
for SD): then every upsampled map matches its skip connection exactly.

The same class also builds the one other UNet minidiff teaches, Kandinsky 2.2's decoder: its own
five blocks (resnets that resample themselves, attention with added key/values) and its image
conditioning live in unet_kandinsky.py; here it needs only its option set
(`DECODER_UNSUPPORTED_UNLESS`), one branch per block type in the constructor, and the forward's
`added_cond_kwargs={"image_embeds": ...}` argument.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import InputError
from minidiff.loading import PretrainedMixin
from minidiff.models.embeddings import TimestepEmbedding, Timesteps, batch_timesteps
from minidiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, up_resnets
from minidiff.models.transformer import SpatialTransformer
from minidiff.models.unet_kandinsky import (
    ImageProjection,
    ImageTimeEmbedding,
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    SimpleCrossAttnDownBlock2D,
    SimpleCrossAttnUpBlock2D,
    UNetMidBlock2DSimpleCrossAttn,
)
from minidiff.single_file import SingleFileMixin

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
DECODER_DOWN_BLOCK_TYPES = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D")
DECODER_UP_BLOCK_TYPES = ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")

# Options of diffusers' UNet2DConditionModel that SD 1.x/2.x leave at their default. A config.json
# may contain them (diffusers' save_pretrained writes every one) with one of the accepted values
# below; any other value is refused with a ValueError naming the option. A list value is accepted
# when each of its entries is (e.g. only_cross_attention: [false, false, false, false]).
UNSUPPORTED_UNLESS: dict[str, tuple] = {
    "down_block_types": DOWN_BLOCK_TYPES,
    "up_block_types": UP_BLOCK_TYPES,
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),  # the resnets hard-code SiLU
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "projection_class_embeddings_input_dim": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "addition_embed_type_num_heads": (64,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}

# The Kandinsky 2.2 decoder (kandinsky-2-2-decoder/unet; blocks in unet_kandinsky.py) takes these
# values instead, all together: a config is the decoder's when one of its down blocks is, and the
# two families' blocks do not mix. Its attention ignores use_linear_projection and upcast_attention
# (as diffusers' does), so only their defaults are accepted. encoder_hid_dim, the width of the image
# embedding, is free (1280 in Kandinsky 2.2); the config checks that it is set.
DECODER_UNSUPPORTED_UNLESS: dict[str, tuple] = {
    **{k: v for k, v in UNSUPPORTED_UNLESS.items() if k != "encoder_hid_dim"},
    "down_block_types": DECODER_DOWN_BLOCK_TYPES,
    "up_block_types": DECODER_UP_BLOCK_TYPES,
    "mid_block_type": ("UNetMidBlock2DSimpleCrossAttn",),
    "resnet_time_scale_shift": ("scale_shift",),
    "encoder_hid_dim_type": ("image_proj",),
    "addition_embed_type": ("image",),
    "num_attention_heads": (None,),  # diffusers refuses it too
    "use_linear_projection": (False,),
    "upcast_attention": (None, False),
}


def is_decoder_config(options: dict) -> bool:
    """True for the Kandinsky 2.2 decoder family: some down block is one of its block types."""
    return any(kind in DECODER_DOWN_BLOCK_TYPES for kind in options.get("down_block_types", ()))


def check_supported(options: dict) -> None:
    """Raise a ValueError for the first option in `options` that minidiff does not implement."""
    decoder = is_decoder_config(options)
    table = DECODER_UNSUPPORTED_UNLESS if decoder else UNSUPPORTED_UNLESS
    family = ("Kandinsky 2.2 decoder UNet (its down blocks are ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D)"
              if decoder else "Stable Diffusion 1.x/2.x UNet")
    for key, accepted in table.items():
        if key not in options:
            continue
        value = options[key]
        entries = value if isinstance(value, (list, tuple)) else [value]
        if not all(v in accepted for v in entries):
            raise InputError(
                f"UNet config option {key}={value!r} is not supported: minidiff implements the "
                f"{family}, where {key} is always one of {list(accepted)}. "
                "This config describes another model family (e.g. SDXL, a class-conditional or an "
                "upscaling UNet), or mixes the blocks of SD and of the Kandinsky decoder."
            )


@dataclass
class UNet2DConditionConfig:
    """The keys of an SD 1.x/2.x or Kandinsky 2.2 decoder `unet/config.json`, with diffusers' defaults."""

    sample_size: int | None = None  # training latent size (64 for 512 px); informational only
    in_channels: int = 4
    out_channels: int = 4  # 8 in the Kandinsky decoder: eps and the learned variance
    center_input_sample: bool = False  # map x -> 2x - 1 first (never set in SD)
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    attention_head_dim: int | list[int] = 8  # SD: the NUMBER of heads; see num_heads_per_block
    num_attention_heads: int | list[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # SD 1.5's config says null: read as False
    # Always at these values in SD (see UNSUPPORTED_UNLESS); kept so such configs read cleanly.
    only_cross_attention: bool | list[bool] = False
    dual_cross_attention: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    transformer_layers_per_block: int | list[int] = 1
    addition_embed_type: str | None = None  # "image" in the Kandinsky decoder
    # The Kandinsky decoder's image conditioning: "image_proj", and the image embedding width.
    encoder_hid_dim_type: str | None = None
    encoder_hid_dim: int | None = None

    def __post_init__(self):
        check_supported(vars(self))
        self.upcast_attention = bool(self.upcast_attention)
        if self.encoder_hid_dim_type == "image_proj" and not isinstance(self.encoder_hid_dim, int):
            raise InputError(
                "encoder_hid_dim_type='image_proj' needs encoder_hid_dim, the width of the image embedding "
                f"(1280 for Kandinsky 2.2's CLIP image encoder), got {self.encoder_hid_dim!r}."
            )
        n = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == n):
            raise InputError(
                f"block_out_channels ({n} levels), down_block_types ({len(self.down_block_types)}) and "
                f"up_block_types ({len(self.up_block_types)}) must have the same length."
            )
        if not isinstance(self.layers_per_block, int):
            raise InputError(
                f"layers_per_block must be one integer for all levels (as in SD), got {self.layers_per_block!r}."
            )
        if not isinstance(self.cross_attention_dim, int):
            raise InputError(
                "cross_attention_dim must be one integer (768 for SD 1.x, 1024 for SD 2.x), "
                f"got {self.cross_attention_dim!r}."
            )
        if self.norm_num_groups is None:
            raise InputError("norm_num_groups=None (no output GroupNorm) is not an SD configuration; SD uses 32.")
        for channels, heads in zip(self.block_out_channels, self.num_heads_per_block()):
            if channels % heads != 0:
                raise InputError(
                    f"A level with {channels} channels cannot be split into {heads} attention heads of equal size."
                )

    def num_heads_per_block(self) -> list[int]:
        """Attention heads of each down level (the up path uses them reversed, the mid block the last).

        The one place that reads the head count. diffusers' `attention_head_dim` is, despite its
        name, the number of heads: SD 1.5 has 8 heads at every level (head_dim 40/80/160), SD 2.x
        [5, 10, 20, 20] heads of head_dim 64. The name is a mistake diffusers keeps for
        compatibility (diffusers issue #2011); it lets `num_attention_heads`, when set, take
        precedence. Everywhere else minidiff says `num_heads` and `head_dim = channels // num_heads`.

        In the Kandinsky decoder's blocks (diffusers' SimpleCrossAttn*) the name tells the truth:
        it is the width of one head (64), so a level of C channels has C // 64 heads (6 to 24).
        """
        n = len(self.block_out_channels)
        if is_decoder_config(vars(self)):
            head_dim = self.attention_head_dim
            if not isinstance(head_dim, int):
                raise InputError(f"attention_head_dim must be one integer in the Kandinsky decoder (the width "
                                 f"of every attention head, 64 there), got {head_dim!r}.")
            for channels in self.block_out_channels:
                if channels % head_dim != 0:
                    raise InputError(f"A level with {channels} channels cannot be split into attention heads of "
                                     f"attention_head_dim = {head_dim} channels each.")
            return [channels // head_dim for channels in self.block_out_channels]
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        if isinstance(heads, int):
            return [heads] * n
        if len(heads) != n:
            raise InputError(f"The head count must be one integer or one per level ({n}), got {list(heads)}.")
        return list(heads)


# ----------------------------------------------------------------------------------------------
# The five block types. Each takes the time embedding temb (B, 4*C0) and the text context
# (B, M, cross_attention_dim); blocks without attention ignore the context.


class DownBlock2D(nn.Module):
    """num_layers resnets, then a stride-2 conv unless this is the deepest level."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for j in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x, temb, context=None):
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(nn.Module):
    """num_layers x (resnet, spatial transformer), then a stride-2 conv unless deepest."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, groups, eps, add_downsample,
                 num_heads, context_dim, use_linear_projection, upcast):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, groups, eps)
             for j in range(num_layers)]
        )
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_channels, num_heads, context_dim, groups, use_linear_projection, upcast)
             for _ in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x, temb, context):
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb), context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H/2, W/2)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet -> spatial transformer -> resnet at the deepest resolution."""

    def __init__(self, channels, temb_channels, groups, eps, num_heads, context_dim, use_linear_projection, upcast):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(channels, num_heads, context_dim, groups, use_linear_projection, upcast)]
        )

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock2D(nn.Module):
    """num_layers x (concat a skip, resnet), then nearest x2 + conv unless this is the top level."""

    def __init__(self, prev_channels, out_channels, skip_channels_last, temb_channels, num_layers, groups, eps,
                 add_upsample):
        super().__init__()
        self.resnets = up_resnets(prev_channels, out_channels, skip_channels_last, temb_channels, num_layers,
                                  groups, eps)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb, context=None):
        # `skips` is the down path's list; each resnet pops its skip from the end.
        for resnet in self.resnets:
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C_running + C_skip, H, W)
            x = resnet(x, temb)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2H, 2W)
        return x


class CrossAttnUpBlock2D(nn.Module):
    """num_layers x (concat a skip, resnet, spatial transformer), then x2 upsampling unless top."""

    def __init__(self, prev_channels, out_channels, skip_channels_last, temb_channels, num_layers, groups, eps,
                 add_upsample, num_heads, context_dim, use_linear_projection, upcast):
        super().__init__()
        self.resnets = up_resnets(prev_channels, out_channels, skip_channels_last, temb_channels, num_layers,
                                  groups, eps)
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_channels, num_heads, context_dim, groups, use_linear_projection, upcast)
             for _ in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x, skips, temb, context):
        for resnet, attn in zip(self.resnets, self.attentions):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C_running + C_skip, H, W)
            x = attn(resnet(x, temb), context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2H, 2W)
        return x


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class UNet2DConditionOutput:
    """What `unet(..., return_dict=True)` returns: `.sample`, and `[0]` as in diffusers."""

    sample: torch.Tensor

    def __getitem__(self, index):
        return (self.sample,)[index]


class UNet2DConditionModel(nn.Module, PretrainedMixin, SingleFileMixin):
    """eps (or v) prediction: unet(x_t, t, text_hidden_states).sample -> (B, out_channels, H, W).

    Kandinsky 2.2 decoder: unet(x_t, t, None, added_cond_kwargs={"image_embeds": z_i}).sample.
    """

    config_class = UNet2DConditionConfig
    # Keys diffusers writes that are not dataclass fields; checked by check_supported, then dropped.
    config_ignore = tuple(k for k in {**UNSUPPORTED_UNLESS, **DECODER_UNSUPPORTED_UNLESS}
                          if k not in {f.name for f in dataclasses.fields(UNet2DConditionConfig)})

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        self.config = c = config
        ch = list(c.block_out_channels)  # channels per level, top to bottom
        heads = c.num_heads_per_block()
        n = len(ch)
        temb_channels = 4 * ch[0]  # 1280 for SD
        norm = dict(groups=c.norm_num_groups, eps=c.norm_eps)
        attn = dict(context_dim=c.cross_attention_dim, use_linear_projection=c.use_linear_projection,
                    upcast=c.upcast_attention)
        simple_attn = dict(context_dim=c.cross_attention_dim)  # the Kandinsky decoder's attention

        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb_channels, act=c.act_fn)
        # Kandinsky decoder: the image embedding becomes the context tokens and joins the time embedding.
        self.encoder_hid_proj = (ImageProjection(c.encoder_hid_dim, c.cross_attention_dim)
                                 if c.encoder_hid_dim_type == "image_proj" else None)
        self.add_embedding = (ImageTimeEmbedding(c.encoder_hid_dim, temb_channels)
                              if c.addition_embed_type == "image" else None)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(c.down_block_types):
            common = dict(in_channels=ch[max(i - 1, 0)], out_channels=ch[i], temb_channels=temb_channels,
                          num_layers=c.layers_per_block, add_downsample=i < n - 1, **norm)
            if kind == "CrossAttnDownBlock2D":
                self.down_blocks.append(CrossAttnDownBlock2D(**common, num_heads=heads[i], **attn))
            elif kind == "DownBlock2D":
                self.down_blocks.append(DownBlock2D(**common))
            elif kind == "SimpleCrossAttnDownBlock2D":
                self.down_blocks.append(SimpleCrossAttnDownBlock2D(**common, num_heads=heads[i], **simple_attn))
            else:
                self.down_blocks.append(ResnetDownsampleBlock2D(**common))

        if c.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(ch[-1], temb_channels, num_heads=heads[-1], **norm, **attn)
        else:
            self.mid_block = UNetMidBlock2DSimpleCrossAttn(ch[-1], temb_channels, num_heads=heads[-1], **norm,
                                                           **simple_attn)

        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(c.up_block_types):
            level = n - 1 - i  # up block i mirrors down block `level`
            common = dict(prev_channels=ch[min(level + 1, n - 1)], out_channels=ch[level],
                          skip_channels_last=ch[max(level - 1, 0)], temb_channels=temb_channels,
                          num_layers=c.layers_per_block + 1, add_upsample=level > 0, **norm)
            if kind == "CrossAttnUpBlock2D":
                self.up_blocks.append(CrossAttnUpBlock2D(**common, num_heads=heads[level], **attn))
            elif kind == "UpBlock2D":
                self.up_blocks.append(UpBlock2D(**common))
            elif kind == "SimpleCrossAttnUpBlock2D":
                self.up_blocks.append(SimpleCrossAttnUpBlock2D(**common, num_heads=heads[level], **simple_attn))
            else:
                self.up_blocks.append(ResnetUpsampleBlock2D(**common))

        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], c.out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config):
        if isinstance(config, dict):
            check_supported(config)  # also the keys that are not dataclass fields
        return super().from_config(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor | None = None,
        return_dict: bool = True,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ):
        """sample (B, in_channels, H, W), timestep (python number, 0-d or (B,) tensor),
        encoder_hidden_states (B, M, cross_attention_dim) -> `.sample` (B, out_channels, H, W).

        The Kandinsky decoder takes added_cond_kwargs={"image_embeds": (B, encoder_hid_dim)}
        instead; its context tokens are made from the image embedding, and encoder_hidden_states,
        if given, is not used (diffusers replaces it the same way).

        As in diffusers: an object with `.sample` (and `[0]`), or with `return_dict=False` the
        tuple `(sample,)`.
        """
        B = self._check_inputs(sample, encoder_hidden_states, added_cond_kwargs)
        t = batch_timesteps(timestep, B, sample.device)  # (B,)
        context = encoder_hidden_states

        x = 2 * sample - 1.0 if self.config.center_input_sample else sample
        # The sinusoidal code is computed in fp32, then cast to the model's dtype.
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))  # (B, 4*C0)
        if self.add_embedding is not None:  # Kandinsky decoder (unCLIP, section 2.1)
            temb = temb + self.add_embedding(added_cond_kwargs["image_embeds"])  # (B, 4*C0)
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(added_cond_kwargs["image_embeds"])  # (B, 32, cross_attention_dim)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        h = self.mid_block(h, temb, context)  # (B, C_last, H/2**(n-1), W/2**(n-1))
        for block in self.up_blocks:
            h = block(h, skips, temb, context)  # pops len(block.resnets) skips
        h = self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

        return UNet2DConditionOutput(h) if return_dict else (h,)

    # -- input checks ------------------------------------------------------------------------------

    def _check_inputs(self, sample: torch.Tensor, context: torch.Tensor | None, added_cond_kwargs: dict | None) -> int:
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise InputError(
                f"The UNet expects latents of shape (batch, {c.in_channels}, height, width), got {tuple(sample.shape)}."
            )
        factor = 2 ** (len(c.block_out_channels) - 1)  # one halving per downsampler
        H, W = sample.shape[-2:]
        if H % factor or W % factor:
            raise InputError(
                f"Latent height and width must be divisible by {factor} (the UNet halves them "
                f"{len(c.block_out_channels) - 1} times and must double back to the same size), got {H}x{W}. "
                f"For SD the image size must therefore be a multiple of {8 * factor} pixels."
            )
        if self.encoder_hid_proj is not None or self.add_embedding is not None:
            self._check_image_embeds(sample, added_cond_kwargs)
            return sample.shape[0]  # the context is made from the image embedding
        if context is None:
            raise InputError(
                f"encoder_hidden_states is required: this UNet attends to text hidden states of shape "
                f"(batch, tokens, {c.cross_attention_dim})."
            )
        if context.ndim != 3 or context.shape[-1] != c.cross_attention_dim:
            raise InputError(
                f"encoder_hidden_states must have shape (batch, tokens, {c.cross_attention_dim}) for this UNet "
                f"(cross_attention_dim), got {tuple(context.shape)}. Is the text encoder the one this UNet "
                "was trained with (SD 1.x: CLIP ViT-L, 768; SD 2.x: OpenCLIP ViT-H, 1024)?"
            )
        if context.shape[0] != sample.shape[0]:
            raise InputError(
                f"Batch sizes differ: sample has {sample.shape[0]}, encoder_hidden_states {context.shape[0]}. "
                "With classifier-free guidance, concatenate the latents too: torch.cat([latents] * 2)."
            )
        if sample.dtype != self.dtype or context.dtype != self.dtype:
            raise InputError(
                f"The UNet weights are {self.dtype}, but sample is {sample.dtype} and encoder_hidden_states is "
                f"{context.dtype}; cast the inputs with .to({self.dtype})."
            )
        return sample.shape[0]

    def _check_image_embeds(self, sample: torch.Tensor, added_cond_kwargs: dict | None) -> None:
        width = self.config.encoder_hid_dim
        image_embeds = (added_cond_kwargs or {}).get("image_embeds")
        if image_embeds is None:
            raise InputError(
                "This UNet (the Kandinsky 2.2 decoder) is conditioned on an image embedding: pass "
                f"added_cond_kwargs={{'image_embeds': tensor of shape (batch, {width})}}, e.g. the prior's output."
            )
        if not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2 or image_embeds.shape[1] != width:
            shape = tuple(image_embeds.shape) if isinstance(image_embeds, torch.Tensor) else type(image_embeds).__name__
            raise InputError(
                f"added_cond_kwargs['image_embeds'] must have shape (batch, {width}) for this UNet (encoder_hid_dim), "
                f"got {shape}. Is it the embedding of the CLIP image encoder this decoder was trained with?"
            )
        if image_embeds.shape[0] != sample.shape[0]:
            raise InputError(
                f"Batch sizes differ: sample has {sample.shape[0]}, image_embeds {image_embeds.shape[0]}. "
                "With classifier-free guidance, concatenate the latents too: torch.cat([latents] * 2)."
            )
        if sample.dtype != self.dtype or image_embeds.dtype != self.dtype:
            raise InputError(
                f"The UNet weights are {self.dtype}, but sample is {sample.dtype} and image_embeds is "
                f"{image_embeds.dtype}; cast the inputs with .to({self.dtype})."
            )

"""VQModel: the vector-quantised autoencoder of Kandinsky 2.2 (MoVQ) and of plain VQ-GAN decoders.

Kandinsky 2.2's decoder UNet denoises a latent that this model turns into an image. The latent is
a VQ-VAE one (van den Oord et al. 2017): every latent pixel is meant to be one vector of a learned
codebook, and MoVQ (Zheng et al. 2022) feeds that quantised latent to every normalisation layer
of the decoder, so that two patches with the same code can still decode differently:

    image x (B, 3, H, W) in [-1, 1]
      -> Encoder -> quant_conv -> z_e (B, vq_embed_dim, H/f, W/f)            encode(x).latents
      -> VectorQuantizer: z_q = e_k, k = argmin_j ||z_e - e_j||^2            VQ-VAE eq. 1-2
      -> post_quant_conv -> Decoder(., zq=z_q) -> image (B, 3, H, W)          decode(z).sample

with f = 2**(len(block_out_channels) - 1) (8 for kandinsky-2-2-decoder/movq: 512x512 -> 64x64).
As in diffusers, `encode` stops before the quantiser; `decode` quantises unless
`force_not_quantize` (the Kandinsky pipelines decode the UNet's latent with force_not_quantize=True:
it is never snapped to the codebook).

Notation (VQ-VAE section 3, MoVQ section 3):
    z_e       the encoder's output at one latent pixel, a vq_embed_dim vector
    e_j       codebook entry j, `quantize.embedding.weight[j]`, j < num_vq_embeddings (K)
    z_q       the nearest entry e_k; on the forward pass z_q, on the backward pass z_e's gradient
              (the straight-through estimator: z_q = z_e + sg[e_k - z_e], VQ-VAE section 3.2)
    sg[.]     stop-gradient, `.detach()`
    beta      0.25, the commitment weight of VQ-VAE eq. 3 (diffusers' VQModel hard-codes it)
    F         a decoder feature map (B, C, h', w')
    SpatialNorm(F, z_q) = GroupNorm(F) * conv_y(z_q') + conv_b(z_q')           MoVQ's spatially
              conditional normalisation: z_q' is z_q resized (nearest) to F's h' x w', and the two
              1x1 convs predict a per-pixel scale gamma and shift beta from the code at that pixel

Two decoder flavours, chosen by config.norm_type:
    "group"    a plain VQ-GAN decoder: every norm a GroupNorm, the decoder sees z_q only as input
    "spatial"  MoVQ: every norm of the decoder (resnets, attentions, conv_norm_out) a SpatialNorm
               conditioned on z_q. The encoder is the same in both.

Contents, top to bottom:
    VQModelConfig            the diffusers config.json keys; unsupported block types refused
    AttnDownEncoderBlock2D   vae.py's DownEncoderBlock2D with a self-attention after each resnet
    Encoder                  image -> z_e (vae.py's blocks; latent_channels outputs, not 2x)
    SpatialNorm, SpatialNormResnetBlock2D, SpatialNormAttention   MoVQ's conditioned layers
    DecoderMidBlock2D, DecoderUpBlock2D, Decoder                  either flavour, conditioned on zq
    VectorQuantizer          nearest codebook entry, straight-through estimator, commitment loss
    VQEncoderOutput, VQDecoderOutput   what encode / decode return, as in diffusers
    VQModel                  encode / decode / forward, from_pretrained / save_pretrained

Module attribute names equal the diffusers checkpoint keys (decoder.up_blocks.0.resnets.0.norm1.conv_y,
decoder.mid_block.attentions.0.spatial_norm.norm_layer, quantize.embedding.weight, ...), so
`load_state_dict(strict=True)` needs no key map.

References:
    van den Oord, Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation Learning" (VQ-VAE)
    Esser, Rombach & Ommer 2021, "Taming Transformers for High-Resolution Image Synthesis" (VQ-GAN:
        the encoder / decoder architecture, shared with the LDM autoencoder of vae.py)
    Zheng, Vuong, Cai & Phung 2022, "MoVQ: Modulating Quantized Vectors for High-Fidelity Image
        Generation" (spatially conditional normalisation in the decoder)
    diffusers: models/autoencoders/vq_model.py, models/autoencoders/vae.py (Encoder, Decoder,
        VectorQuantizer), models/attention_processor.py (SpatialNorm), models/resnet.py
        (ResnetBlockCondNorm2D) -- the parity reference
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import InputError
from minidiff.loading import PretrainedMixin
from minidiff.models.attention import Attention
from minidiff.models.resnet import ResnetBlock2D, Upsample2D
from minidiff.models.vae import (NORM_EPS, DecoderOutput, DownEncoderBlock2D, MidBlock2D,
                                 SpatialSelfAttention)

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCK_TYPES = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")
NORM_TYPES = ("group", "spatial")
# SpatialNorm's GroupNorm has 32 groups whatever norm_num_groups says: diffusers hard-codes it
# (the MoVQ checkpoints use 32 everywhere), so the checkpoint only loads with that grouping.
SPATIAL_NORM_GROUPS = 32
# VQ-VAE eq. 3's beta; diffusers' VQModel builds its quantiser with beta=0.25, not a config key.
COMMITMENT_BETA = 0.25


@dataclasses.dataclass
class VQModelConfig:
    """The keys of a diffusers VQModel `config.json` (kandinsky-2-2-decoder/movq). Defaults are
    diffusers' defaults; the movq config sets block_out_channels [128, 256, 256, 512], attention at
    the lowest level, latent_channels 4, num_vq_embeddings 16384 and norm_type "spatial"."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 3
    sample_size: int = 32
    num_vq_embeddings: int = 256  # K, the codebook size
    norm_num_groups: int = 32
    vq_embed_dim: int | None = None  # width of a codebook vector; None means latent_channels
    # 0.18215 is the SD VAE's latent scale (vae.py), diffusers' default; Kandinsky's pipelines do
    # not multiply the MoVQ latent by it.
    scaling_factor: float = 0.18215
    norm_type: str = "group"  # "group" (VQ-GAN) or "spatial" (MoVQ)
    mid_block_add_attention: bool = True
    # decode(indices, force_not_quantize=True, shape=...) looks the codebook entries up itself.
    lookup_from_codebook: bool = False
    force_upcast: bool = False  # tells pipelines whether to run this model in fp32 beside fp16

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, types, supported in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                      ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in supported]
            if bad:
                raise InputError(f"{key}={list(types)}: minidiff's VQModel supports only {list(supported)}, "
                                 f"got {bad}.")
            if len(types) != n:
                raise InputError(f"{key} has {len(types)} entries but block_out_channels has {n}; "
                                 "give one block type per resolution level.")
        if self.act_fn != "silu":
            raise InputError(f"act_fn={self.act_fn!r}: minidiff's VQModel supports only 'silu' "
                             "(the activation of the VQ-GAN / MoVQ autoencoders).")
        if self.norm_type not in NORM_TYPES:
            raise InputError(f"norm_type={self.norm_type!r}: choose 'group' (a plain VQ-GAN decoder) or "
                             "'spatial' (MoVQ's decoder, conditioned on the quantised latent).")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise InputError(f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"block_out_channels={list(self.block_out_channels)}; {bad} are not multiples.")
        if self.norm_type == "spatial":
            bad = [c for c in self.block_out_channels if c % SPATIAL_NORM_GROUPS]
            if bad:
                raise InputError(f"norm_type='spatial' normalises with {SPATIAL_NORM_GROUPS} groups, so every entry "
                                 f"of block_out_channels={list(self.block_out_channels)} must be a multiple of "
                                 f"{SPATIAL_NORM_GROUPS}; {bad} are not.")
            if self.vq_embed_dim not in (None, self.latent_channels):
                raise InputError(f"norm_type='spatial' conditions the decoder's norms on the quantised latent "
                                 f"({self.vq_embed_dim} channels) through convs built for latent_channels="
                                 f"{self.latent_channels}; set vq_embed_dim to {self.latent_channels} (or null).")

    @property
    def embed_dim(self) -> int:
        """The width of a codebook vector: vq_embed_dim, or latent_channels when that is null."""
        return self.latent_channels if self.vq_embed_dim is None else self.vq_embed_dim


# ----------------------------------------------------------------------------------------------
# Encoder: the VQ-GAN / LDM encoder of vae.py, with attention allowed at any level


class AttnDownEncoderBlock2D(DownEncoderBlock2D):
    """vae.py's DownEncoderBlock2D (resnets, then a stride-2 conv) with a one-head self-attention
    over all pixels after every resnet (movq has it at the lowest level, 32x32 for 256x256 input)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__(in_channels, out_channels, num_layers, groups, downsample)
        self.attentions = nn.ModuleList([SpatialSelfAttention(out_channels, groups) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x))
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, h/2, w/2)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> z_e before quant_conv, (B, latent_channels, H/f, W/f)."""

    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        blocks = {"DownEncoderBlock2D": DownEncoderBlock2D, "AttnDownEncoderBlock2D": AttnDownEncoderBlock2D}
        self.down_blocks = nn.ModuleList([
            blocks[kind](chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups,
                         downsample=i < len(chans) - 1)
            for i, kind in enumerate(cfg.down_block_types)
        ])
        self.mid_block = MidBlock2D(chans[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=NORM_EPS)
        # latent_channels outputs: a point, not a Gaussian's (mean, logvar) as in the KL encoder.
        self.conv_out = nn.Conv2d(chans[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, latent, H/f, W/f)


# ----------------------------------------------------------------------------------------------
# MoVQ's spatially conditioned layers


class SpatialNorm(nn.Module):
    """GroupNorm(F) * conv_y(z_q') + conv_b(z_q'), z_q' = z_q resized (nearest) to F's size.

    MoVQ's spatially conditional normalisation (SPADE-like): the quantised latent, not a learned
    per-channel constant, sets the scale and shift at each pixel. The GroupNorm keeps its own affine
    weight and bias (diffusers' affine=True), applied before the modulation.
    """

    def __init__(self, f_channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(SPATIAL_NORM_GROUPS, f_channels, eps=NORM_EPS)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, 1)  # gamma(z_q): the scale
        self.conv_b = nn.Conv2d(zq_channels, f_channels, 1)  # beta(z_q): the shift

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        # (B, C_zq, h, w) -> (B, C_zq, h', w'): each code covers the (h'/h) x (w'/w) pixels above it
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)  # (B, C_f, h', w')


class SpatialNormResnetBlock2D(nn.Module):
    """ResnetBlock2D (resnet.py) with both GroupNorms replaced by SpatialNorms conditioned on z_q:
    SpatialNorm -> SiLU -> conv3x3 -> SpatialNorm -> SiLU -> conv3x3, plus the (1x1-conv) shortcut.
    diffusers calls it ResnetBlockCondNorm2D(time_embedding_norm="spatial")."""

    def __init__(self, in_channels: int, out_channels: int, zq_channels: int):
        super().__init__()
        self.norm1 = SpatialNorm(in_channels, zq_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SpatialNorm(out_channels, zq_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(F.silu(self.norm2(h, zq)))  # (dropout is 0 in every config)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SpatialNormAttention(Attention):
    """vae.py's SpatialSelfAttention with its GroupNorm replaced by a SpatialNorm: one head over
    all h*w pixels, plus a residual. Keys: spatial_norm.*, to_q, to_k, to_v, to_out.0."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__(query_dim=channels, num_heads=1, head_dim=channels, bias=True)
        self.spatial_norm = SpatialNorm(channels, zq_channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        B, C, height, width = x.shape
        h = self.spatial_norm(x, zq)
        h = h.view(B, C, height * width).transpose(1, 2)  # (B, h*w, C): one token per pixel
        h = super().forward(h)  # (B, h*w, C)
        h = h.transpose(1, 2).reshape(B, C, height, width)  # (B, C, h, w)
        return x + h


# ----------------------------------------------------------------------------------------------
# Decoder: either flavour. Every layer takes (x, *cond): cond is () for "group" (vae.py's
# ResnetBlock2D and SpatialSelfAttention) and (z_q,) for "spatial" (the layers above).


def _resnet(in_channels: int, out_channels: int, groups: int, zq_channels: int | None) -> nn.Module:
    if zq_channels is None:
        return ResnetBlock2D(in_channels, out_channels, groups=groups, eps=NORM_EPS)
    return SpatialNormResnetBlock2D(in_channels, out_channels, zq_channels)


def _attention(channels: int, groups: int, zq_channels: int | None) -> nn.Module:
    if zq_channels is None:
        return SpatialSelfAttention(channels, groups)
    return SpatialNormAttention(channels, zq_channels)


class DecoderMidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (vae.py's MidBlock2D, conditioned)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, zq_channels: int | None):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(channels, channels, groups, zq_channels) for _ in range(2)])
        self.attentions = nn.ModuleList([_attention(channels, groups, zq_channels)] if add_attention else [])

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, *cond)
        for attn in self.attentions:
            x = attn(x, *cond)
        return self.resnets[1](x, *cond)


class DecoderUpBlock2D(nn.Module):
    """`num_layers` resnets (each followed by an attention in an AttnUpDecoderBlock2D), then
    (except at the last level) nearest x2 upsampling + conv (vae.py's UpDecoderBlock2D, conditioned)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_attention: bool, upsample: bool, zq_channels: int | None):
        super().__init__()
        self.resnets = nn.ModuleList([
            _resnet(in_channels if i == 0 else out_channels, out_channels, groups, zq_channels)
            for i in range(num_layers)
        ])
        # Empty for an UpDecoderBlock2D: an empty ModuleList adds no "attentions.*" keys.
        self.attentions = nn.ModuleList([_attention(out_channels, groups, zq_channels) for _ in range(num_layers)]
                                        if add_attention else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, *cond)
            if self.attentions:
                x = self.attentions[i](x, *cond)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2h, 2w)
        return x


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) [+ z_q (B, latent_channels, h, w) for "spatial"] ->
    image (B, out_channels, h*f, w*f); the encoder mirrored, with layers_per_block + 1 resnets a level."""

    def __init__(self, cfg: VQModelConfig):
        super().__init__()
        chans, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        # The SpatialNorms' 1x1 convs read z_q with latent_channels channels (diffusers builds them
        # from the decoder's input width; the config check makes vq_embed_dim equal to it).
        zq = cfg.latent_channels if cfg.norm_type == "spatial" else None
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = DecoderMidBlock2D(chans[0], groups, cfg.mid_block_add_attention, zq)
        self.up_blocks = nn.ModuleList([
            DecoderUpBlock2D(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, groups,
                             add_attention=kind == "AttnUpDecoderBlock2D", upsample=i < len(chans) - 1,
                             zq_channels=zq)
            for i, kind in enumerate(cfg.up_block_types)
        ])
        self.conv_norm_out = (SpatialNorm(chans[-1], zq) if zq is not None
                              else nn.GroupNorm(groups, chans[-1], eps=NORM_EPS))
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        cond = () if zq is None else (zq,)
        h = self.conv_in(z)  # (B, C_last, h, w)
        h = self.mid_block(h, *cond)
        for block in self.up_blocks:
            h = block(h, *cond)  # (B, C_i, ...): doubles h and w at every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(h, *cond)))  # (B, out_channels, h*f, w*f)


# ----------------------------------------------------------------------------------------------
# The quantiser


class VectorQuantizer(nn.Module):
    """Snap every latent pixel to its nearest codebook vector (VQ-VAE section 3.1).

    forward(z_e (B, D, h, w)) -> (z_q (B, D, h, w), loss (), (None, None, indices (B*h*w,))), the
    return shape of diffusers' VectorQuantizer (its perplexity and one-hot encodings are None too),
    so a training loop written for diffusers runs unchanged.
    """

    def __init__(self, num_embeddings: int, embed_dim: int, beta: float = COMMITMENT_BETA, legacy: bool = True):
        super().__init__()
        self.num_embeddings, self.embed_dim, self.beta, self.legacy = num_embeddings, embed_dim, beta, legacy
        self.embedding = nn.Embedding(num_embeddings, embed_dim)  # (K, D): row j is e_j
        # The taming-transformers initialisation, U(-1/K, 1/K) (what a from-scratch training starts at).
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, h, w, D): one D-vector per latent pixel
        z_flat = z.view(-1, self.embed_dim)  # (N, D), N = B*h*w
        # k = argmin_j ||z_e - e_j||^2 (VQ-VAE eq. 1). cdist returns the distance, whose argmin is the
        # squared distance's; it is what diffusers calls, so near-ties among 16384 codes break the same
        # way. (For more than 25 rows it evaluates ||z||^2 - 2 z.e + ||e||^2 with one matmul.)
        indices = torch.cdist(z_flat, self.embedding.weight).argmin(dim=1)  # (N,)
        z_q = self.embedding(indices).view(z.shape)  # (B, h, w, D): e_k at every pixel
        # VQ-VAE eq. 3 without the reconstruction term: the codebook term ||sg[z_e] - e||^2 pulls
        # the codes towards the encoder, the commitment term beta ||z_e - sg[e]||^2 the encoder
        # towards its code. legacy=True (diffusers' and taming's default, kept for the checkpoints
        # trained with it) puts beta on the codebook term instead.
        codebook = torch.mean((z_q - z.detach()) ** 2)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else self.beta * commitment + codebook
        # Straight-through estimator: the forward value is z_q, the gradient w.r.t. z is the identity.
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Codebook rows for integer `indices` (any shape, N in all); with shape = (B, h, w, D),
        returned as a latent (B, D, h, w), else as (N, D)."""
        z_q = self.embedding(indices.reshape(-1))  # (N, D)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()  # (B, h, w, D) -> (B, D, h, w)
        return z_q


# ----------------------------------------------------------------------------------------------
# Outputs and the model


@dataclasses.dataclass
class VQEncoderOutput:
    """What `movq.encode(x)` returns: `.latents`, the unquantised z_e (B, D, h, w); `[0]` as in diffusers."""

    latents: torch.Tensor

    def __getitem__(self, index):
        return (self.latents,)[index]


@dataclasses.dataclass
class VQDecoderOutput(DecoderOutput):
    """What `movq.decode(z)` and `movq(x)` return: vae.py's DecoderOutput (`.sample`, the image)
    plus `.commit_loss`, the quantiser's loss: a scalar when decode quantised, else diffusers'
    zeros(h.shape[0]) ((B,) for a latent, (N,) int64 for codebook indices). `[0]` is the sample
    and `[1]` the loss, as in diffusers."""

    commit_loss: torch.Tensor | None = None

    def __getitem__(self, index):
        return (self.sample, self.commit_loss)[index]


class VQModel(nn.Module, PretrainedMixin):
    """MoVQ / VQ-GAN. `encode(x).latents` -> z_e, `decode(z).sample` -> image, `forward(x).sample`
    -> reconstruction. `return_dict=False` gives (latents,) and (sample, commit_loss)."""

    config_class = VQModelConfig

    def __init__(self, config: VQModelConfig):
        super().__init__()
        self.config = config
        c, d = config.latent_channels, config.embed_dim
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(c, d, 1)  # (B, latent, h, w) -> (B, D, h, w)
        self.quantize = VectorQuantizer(config.num_vq_embeddings, d)
        self.post_quant_conv = nn.Conv2d(d, c, 1)  # (B, D, h, w) -> (B, latent, h, w)
        self.decoder = Decoder(config)

    @property
    def downsample_factor(self) -> int:
        """f: image pixels per latent pixel along each side (pipelines call it movq_scale_factor)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- input checks ------------------------------------------------------------------------

    def _check_dtype(self, x: torch.Tensor, what: str) -> None:
        if x.dtype != self.dtype:
            raise InputError(f"The VQModel's weights are {self.dtype}, but the {what} is {x.dtype}; "
                             f"cast it with .to({self.dtype}).")

    def _check_image(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise InputError(f"encode expects images shaped (B, {self.config.in_channels}, H, W); "
                             f"got shape {tuple(x.shape)}.")
        f = self.downsample_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise InputError(
                f"Image height and width must be multiples of {f} = 2**(len(block_out_channels) - 1), "
                f"because the encoder halves them {len(self.config.block_out_channels) - 1} times and "
                f"the decoder must give the same size back; got {x.shape[2]}x{x.shape[3]}. "
                f"Resize or crop the image, e.g. to {x.shape[2] // f * f}x{x.shape[3] // f * f}.")
        self._check_dtype(x, "image")

    def _check_latent(self, h: torch.Tensor, lookup: bool, shape) -> None:
        d = self.config.embed_dim
        if lookup:
            if h.is_floating_point():
                raise InputError(f"With lookup_from_codebook and force_not_quantize, decode expects integer "
                                 f"codebook indices; got a {h.dtype} tensor.")
            if shape is None or len(shape) != 4 or shape[3] != d or h.numel() != shape[0] * shape[1] * shape[2]:
                raise InputError(f"Decoding codebook indices needs shape=(B, h, w, {d}) with B*h*w = "
                                 f"{h.numel()} (the number of indices given); got shape={shape}.")
            return
        if h.ndim != 4 or h.shape[1] != d:
            raise InputError(f"decode expects latents shaped (B, {d}, h, w) (vq_embed_dim channels, what "
                             f"encode returns); got shape {tuple(h.shape)}.")
        self._check_dtype(h, "latent")

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1], (B, 3, H, W) -> z_e (B, D, H/f, W/f) as `.latents`, not yet quantised."""
        self._check_image(x)
        h = self.quant_conv(self.encoder(x))  # (B, D, H/f, W/f)
        return VQEncoderOutput(h) if return_dict else (h,)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False, return_dict: bool = True,
               shape: tuple[int, ...] | None = None):
        """Latents (B, D, h, w) -> images (B, 3, h*f, w*f) as `.sample`, and the commitment loss.

        Quantises h first unless `force_not_quantize` (the Kandinsky pipelines pass True). With
        config.lookup_from_codebook and force_not_quantize, h holds codebook indices instead and
        `shape` = (B, h, w, D) says how to lay their vectors out.
        """
        lookup = force_not_quantize and self.config.lookup_from_codebook
        self._check_latent(h, lookup, shape)
        if not force_not_quantize:
            quant, commit_loss, _ = self.quantize(h)  # (B, D, h, w), ()
        else:
            quant = self.quantize.get_codebook_entry(h, shape) if lookup else h
            # diffusers' zeros: one per entry of h's first axis, in h's dtype and on its device.
            commit_loss = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
        # MoVQ conditions every decoder norm on `quant`, the latent *before* post_quant_conv.
        zq = quant if self.config.norm_type == "spatial" else None
        image = self.decoder(self.post_quant_conv(quant), zq)  # (B, out_channels, h*f, w*f)
        return VQDecoderOutput(image, commit_loss) if return_dict else (image, commit_loss)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Reconstruct x: decode(encode(x)) with quantisation; `.commit_loss` is the VQ loss to add
        to a training objective (VQ-VAE eq. 3 without its reconstruction term)."""
        out = self.decode(self.encode(sample).latents)
        return out if return_dict else (out.sample, out.commit_loss)

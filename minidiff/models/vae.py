"""AutoencoderKL: the Stable Diffusion VAE that maps images to latents and back.

Latent diffusion (Rombach et al. 2022, section 3.1) runs the diffusion model on a small latent
instead of pixels. This file holds the autoencoder that makes the latent:

    image x (B, 3, H, W) in [-1, 1]
      -> Encoder -> quant_conv -> moments (B, 2*latent_channels, H/f, W/f)
      -> DiagonalGaussian(mean, logvar)              q(z | x), one Gaussian per latent entry
      -> z = mean + std * eps  (or z = mean)         (B, latent_channels, H/f, W/f)
      -> post_quant_conv -> Decoder -> image (B, 3, H, W)

with f = 2**(len(block_out_channels) - 1) = 8 for SD 1.x / 2.x (4 latent channels, 512x512 ->
64x64). "KL" names the training loss: a small KL penalty towards N(0, I) keeps the latent
Gaussian-like (LDM appendix G). Pipelines multiply z by `scaling_factor` before diffusion and
divide by it before decoding; encode/decode here do not.

Contents, top to bottom:
    AutoencoderKLConfig   the diffusers config.json keys; only the SD block types are accepted
    DiagonalGaussian      mean, logvar (clamped), std, var, sample, mode, kl
    SpatialSelfAttention  the mid-block attention: one head over all H*W pixels
    MidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D, Encoder, Decoder
    AutoencoderKLOutput, DecoderOutput   what encode / decode return, as in diffusers
    AutoencoderKL         encode / decode / forward, from_pretrained / save_pretrained,
                          slicing (one image of the batch at a time) and tiling (overlapping
                          tiles, blended linearly), as diffusers' enable_slicing / enable_tiling

Module attribute names equal the diffusers checkpoint keys (encoder.down_blocks.0.resnets.0.conv1,
encoder.mid_block.attentions.0.to_q, ...), so `load_state_dict(strict=True)` needs no key map.

References:
    Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (reparameterisation, KL in appendix B)
    Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
    CompVis latent-diffusion: ldm/modules/diffusionmodules/model.py (Encoder, Decoder, AttnBlock),
        ldm/modules/distributions/distributions.py (DiagonalGaussianDistribution)
    diffusers: models/autoencoders/autoencoder_kl.py, models/autoencoders/vae.py (parity reference;
        also the reference for the tile size, the 0.25 overlap and the blend_v / blend_h scheme)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import InputError
from minidiff.loading import PretrainedMixin
from minidiff.models.attention import Attention
from minidiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from minidiff.single_file import SingleFileMixin

# Every GroupNorm of the LDM autoencoder uses eps 1e-6 (the PyTorch default is 1e-5).
NORM_EPS = 1e-6


@dataclasses.dataclass
class AutoencoderKLConfig:
    """The keys of a diffusers `vae/config.json`. Defaults are diffusers' defaults; an SD 1.x/2.x
    config sets block_out_channels [128, 256, 512, 512], four block types and layers_per_block 2."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32  # image size trained on; the tiling issue will use it
    # 0.18215 = 1 / (std of the SD VAE latents of training images, about 5.49): multiplying z by
    # it gives the diffusion model latents of roughly unit variance (LDM paper, section 4.3.2;
    # `scale_factor` in stable-diffusion's configs/stable-diffusion/v1-inference.yaml).
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # SD3 / Flux latents: z = (z - shift) * scale; unused by SD 1/2
    latents_mean: tuple[float, ...] | None = None  # per-channel statistics (SDXL-era VAEs); unused here
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True  # tells pipelines to run this VAE in fp32 when the rest is fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        for key, types, supported in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                      ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            bad = [t for t in types if t != supported]
            if bad:
                raise InputError(f"{key}={list(types)}: minidiff's AutoencoderKL supports only "
                                 f"{supported!r} (the Stable Diffusion VAE), got {bad}.")
            if len(types) != n:
                raise InputError(f"{key} has {len(types)} entries but block_out_channels has {n}; "
                                 "give one block type per resolution level.")
        if self.act_fn != "silu":
            raise InputError(f"act_fn={self.act_fn!r}: minidiff's AutoencoderKL supports only 'silu' "
                             "(the activation of every Stable Diffusion VAE).")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise InputError(f"norm_num_groups={self.norm_num_groups} must divide every entry of "
                             f"block_out_channels={list(self.block_out_channels)}; {bad} are not multiples.")


class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), built from the encoder's moments (B, 2C, h, w).

    The first C channels are the mean, the last C the log-variance, which is clamped to
    [-30, 20] as in the LDM code so exp() can neither underflow to 0 nor overflow.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, C, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (the reparameterisation trick, Kingma & Welling eq. 10).

        The noise is drawn on the generator's device (a CPU generator gives the same z on every
        machine) and then moved to the mean's device, as diffusers does."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely z: the mean. SD pipelines that want a deterministic latent use this."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(self || other) per batch element, summed over (C, h, w); `other` defaults to N(0, I):
        0.5 * sum(mean^2 + var - 1 - logvar)    (Kingma & Welling 2014, appendix B)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var
                               - 1.0 - self.logvar + other.logvar, dim=[1, 2, 3])


class SpatialSelfAttention(Attention):
    """GroupNorm, then self-attention in which every pixel is a token, plus a residual (LDM's AttnBlock).

    One head whose width is the channel count (512 in SD), over all h*w positions of the lowest
    resolution (64*64 = 4096 tokens for a 512x512 image). diffusers stores it as an `Attention`
    with a `group_norm`, so the keys are group_norm, to_q, to_k, to_v, to_out.0 (all with bias).

    NOTE (triton backend): the call below goes through `attention()`, so the backend switch
    applies. minidiff's flash-attention kernel does not take a 512-wide head; on CUDA this call
    must fall back to SDPA. Whoever adds the Triton backend: make the dispatcher (or the kernel
    wrapper) route head_dim > the kernel's limit to "sdpa", and test it with this block.
    """

    def __init__(self, channels: int, groups: int):
        # upcast=False: like diffusers' default processor (SDPA in the model's dtype); the
        # "math" backend computes in fp32 anyway.
        super().__init__(query_dim=channels, num_heads=1, head_dim=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, height, width = x.shape
        h = self.group_norm(x)
        h = h.view(B, C, height * width).transpose(1, 2)  # (B, h*w, C): one token per pixel
        h = super().forward(h)  # (B, h*w, C)
        h = h.transpose(1, 2).reshape(B, C, height, width)  # (B, C, h, w)
        return x + h


class MidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (channels unchanged)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups=groups, eps=NORM_EPS)
                                      for _ in range(2)])
        # Without attention the checkpoint simply has no "attentions.*" keys.
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (except at the last level) a stride-2 conv that halves h and w."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=NORM_EPS)
            for i in range(num_layers)
        ])
        # LDM pads only right and bottom, then convolves without padding (see resnet.py).
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, asymmetric_padding=True)])
                             if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, h/2, w/2)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (layers_per_block + 1 in the decoder), then (except at the last level)
    nearest x2 upsampling + conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=NORM_EPS)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2h, 2w)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*latent_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups,
                               downsample=i < len(chans) - 1)
            for i in range(len(chans))
        ])
        self.mid_block = MidBlock2D(chans[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=NORM_EPS)
        # Twice the latent channels: a mean and a log-variance for every latent entry.
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f); the encoder mirrored."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        chans, groups = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock2D(chans[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, groups,
                             upsample=i < len(chans) - 1)
            for i in range(len(chans))
        ])
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C_last, h, w)
        h = self.mid_block(h)
        for block in self.up_blocks:
            h = block(h)  # (B, C_i, ...): doubles h and w at every level but the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h*f, w*f)


@dataclasses.dataclass
class AutoencoderKLOutput:
    """What `vae.encode(x)` returns: `.latent_dist`, the posterior q(z | x); `[0]` as in diffusers."""

    latent_dist: DiagonalGaussian

    def __getitem__(self, index):
        return (self.latent_dist,)[index]


@dataclasses.dataclass
class DecoderOutput:
    """What `vae.decode(z)` and `vae(x)` return: `.sample`, the image (B, 3, H, W); `[0]` as in diffusers."""

    sample: torch.Tensor

    def __getitem__(self, index):
        return (self.sample,)[index]


class AutoencoderKL(nn.Module, PretrainedMixin, SingleFileMixin):
    """The SD VAE. `encode(x).latent_dist` -> DiagonalGaussian, `decode(z).sample` -> image,
    `forward(x).sample` -> reconstruction. `return_dict=False` gives 1-tuples instead."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the encoder/decoder and the latent (named "quant" after the VQ-GAN
        # ancestor of this model; here they quantise nothing).
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        """f: image pixels per latent pixel along each side (pipelines call it vae_scale_factor)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    # -- input checks ------------------------------------------------------------------------

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

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise InputError(f"decode expects latents shaped (B, {self.config.latent_channels}, h, w); "
                             f"got shape {tuple(z.shape)}.")

    # -- encode / decode ---------------------------------------------------------------------
    # encode/decode are thin wrappers around _encode_one/_decode_one, the unit of work that
    # slicing (one image of the batch at a time) and tiling (one overlapping tile at a time,
    # blended) repeat; see "slicing and tiling" below.

    def _encode_one(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> moments (B, 2*latent_channels, H/f, W/f)."""
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1], (B, 3, H, W) -> q(z | x) as `.latent_dist`. Take `.sample(generator)`
        or `.mode()` of it and multiply by config.scaling_factor before handing it to the UNet."""
        self._check_image(x)
        posterior = DiagonalGaussian(self._encode_sliced(x))
        return AutoencoderKLOutput(posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latents (B, latent_channels, h, w) -> images (B, 3, h*f, w*f) as `.sample`, roughly in
        [-1, 1]. Divide the UNet's latent by config.scaling_factor first."""
        self._check_latent(z)
        image = self._decode_sliced(z)
        return DecoderOutput(image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        """Reconstruct x: decode(z) with z the posterior mean, or a sample when `sample_posterior`."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    # -- slicing and tiling ------------------------------------------------------------------
    # Two ways to bound the activation memory of encode/decode (diffusers' enable_slicing and
    # enable_tiling; the weights are untouched, only the work is cut into pieces):
    #   slicing  a batch of B images runs as B batches of one. Exact: every op of the VAE acts
    #            on each image separately (GroupNorm normalises per image), so the result equals
    #            the whole-batch one up to float summation order.
    #   tiling   an image larger than the training size runs as overlapping tiles of that size;
    #            the tiles' outputs are cross-faded where they overlap. Approximate: GroupNorm
    #            statistics and the mid-block attention then see one tile instead of the whole
    #            image, so a tiled result differs from an untiled one (no visible seams thanks to
    #            the blend, but tile-to-tile tone shifts are possible).
    # The switches are class attributes, so an instance starts with both off; enable_* / disable_*
    # set them on the instance.

    use_slicing: bool = False
    use_tiling: bool = False
    # Neighbouring tiles share a quarter of their side (diffusers' tile_overlap_factor).
    tile_overlap_factor: float = 0.25

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time (peak activation memory of one image)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self) -> None:
        """Encode images larger than `tile_sample_min_size` (and decode latents larger than
        `tile_latent_min_size`) as overlapping tiles blended together (memory of one tile)."""
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    @property
    def tile_sample_min_size(self) -> int:
        """Tile side in pixels: config.sample_size (512 in SD 1.5's vae/config.json, 768 in SD 2.x's),
        so tiling only changes images larger than that. A (height, width) sample_size uses its first
        entry, as diffusers does for the latent tile."""
        size = self.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def tile_latent_min_size(self) -> int:
        """Tile side in latent pixels: tile_sample_min_size / f (64 for a 512 tile and f = 8)."""
        return self.tile_sample_min_size // self.downsample_factor

    def _encode_sliced(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> moments, one image at a time when slicing is on."""
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._encode_tiled(one) for one in x.split(1)])  # B x (1, 2C, h, w) -> (B, 2C, h, w)
        return self._encode_tiled(x)

    def _decode_sliced(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) -> images, one latent at a time when slicing is on."""
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_tiled(one) for one in z.split(1)])  # B x (1, 3, H, W) -> (B, 3, H, W)
        return self._decode_tiled(z)

    def _encode_tiled(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._run_tiled(x, self._encode_one, self.tile_sample_min_size, self.tile_latent_min_size)
        return self._encode_one(x)

    def _decode_tiled(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._run_tiled(z, self._decode_one, self.tile_latent_min_size, self.tile_sample_min_size)
        return self._decode_one(z)

    def _run_tiled(self, x: torch.Tensor, fn, tile_in: int, tile_out: int) -> torch.Tensor:
        """Apply `fn` (encoder or decoder) to overlapping tiles of x and stitch the outputs.

        Input tiles of side tile_in start every `stride` = tile_in * (1 - overlap) pixels (the last
        ones in each row and column are cut short by the image border). Each output tile (side about
        tile_out) is cross-faded over `blend` = tile_out * overlap rows with the tile above it and
        over `blend` columns with the tile to its left, then its first keep = tile_out - blend rows
        and columns go into the result. Output tile (r, c) starts at r * stride_out (= r * keep for
        SD's sizes), so the kept parts tile the output without gaps.

        Tiles are blended in raster order and in place, each with its already-blended neighbours:
        this is the exact order of diffusers' tiled_encode / tiled_decode (blend_v, then blend_h),
        so the results agree to float rounding.
        """
        overlap = self.tile_overlap_factor
        stride = int(tile_in * (1 - overlap))  # e.g. 64 * 0.75 = 48 latent pixels for SD decode
        blend = int(tile_out * overlap)  # e.g. 512 * 0.25 = 128 image pixels
        keep = tile_out - blend  # e.g. 384
        H, W = x.shape[-2:]
        tiles = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, W, stride)]
                 for i in range(0, H, stride)]  # rows x cols of (B, C_out, <=tile_out, <=tile_out)
        for r, row in enumerate(tiles):
            for c, tile in enumerate(row):
                if r > 0:
                    self._blend_rows(tiles[r - 1][c], tile, blend)
                if c > 0:
                    self._blend_cols(row[c - 1], tile, blend)
        rows = [torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in tiles]  # (B, C, keep, W')
        return torch.cat(rows, dim=2)  # (B, C, H', W')

    @staticmethod
    def _ramp(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (1 - y/extent, y/extent) for y = 0 .. extent-1: the old tile fades out linearly
        while the new one fades in. Computed in float64 and rounded once, like the Python floats
        diffusers multiplies by."""
        y = torch.arange(extent, dtype=torch.float64, device=like.device) / extent  # (extent,)
        return (1 - y).to(like.dtype), y.to(like.dtype)

    @classmethod
    def _blend_rows(cls, above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
        """In place: the first `extent` rows of `tile` become a cross-fade from the last `extent`
        rows of the tile above (diffusers' blend_v)."""
        extent = min(above.shape[2], tile.shape[2], extent)
        if extent == 0:
            return
        fade_out, fade_in = cls._ramp(extent, tile)
        tile[:, :, :extent, :] = (above[:, :, -extent:, :] * fade_out[:, None]  # (B, C, extent, w) * (extent, 1)
                                  + tile[:, :, :extent, :] * fade_in[:, None])

    @classmethod
    def _blend_cols(cls, left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
        """In place: the first `extent` columns of `tile` become a cross-fade from the last
        `extent` columns of the tile to its left (diffusers' blend_h)."""
        extent = min(left.shape[3], tile.shape[3], extent)
        if extent == 0:
            return
        fade_out, fade_in = cls._ramp(extent, tile)
        # (B, C, h, extent) * (extent,): the weights broadcast along the last (width) axis
        tile[:, :, :, :extent] = left[:, :, :, -extent:] * fade_out + tile[:, :, :, :extent] * fade_in

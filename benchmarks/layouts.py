"""einops.rearrange vs view/permute chains on the hot paths: what minidiff's choice rests on.

Two layout changes run in every UNet attention block:
    Attention.forward (models/attention.py)   heads split "b n (h d) -> b h n d" (q, k, v) and
                                              merged "b h n d -> b n (h d)": 4 per layer, 2 layers
                                              per block. minidiff: view/transpose.
    SpatialTransformer.forward (models/transformer.py)   pixels to tokens "b c h w -> b (h w) c"
                                              and back: 2 per block. minidiff: einops.
Each forward is timed written both ways, in one process, in turns (a, b, a, b, ...) on the same
inputs, after checking that both give bit-identical results; medians and the ratio to the
all-view/permute version are printed. einops' cost is per call (Python: parse-cache lookup and
backend dispatch, ~6 us on this project's CPU), so it shows where a forward is short (small
shapes, a fast GPU) and vanishes under SD-sized matmuls.

    python benchmarks/layouts.py [--device cuda] [--repeats 50]

Shapes: SD 1.5's first UNet level at a 32x32 latent (256 px) with batch 2 (classifier-free
guidance): 1024 image tokens, 320 channels, 8 heads of 40, 77 text tokens of 768; the tiny
shapes of the tests' random models; and whole tiny UNets ("sd1", "sd2" of minidiff.reference).
"""

from __future__ import annotations

import argparse

import torch
from common import describe_machine, interleaved_median_times
from einops import rearrange

from minidiff.models.attention import Attention, attention
from minidiff.models.transformer import SpatialTransformer
from minidiff.models.unet import UNet2DConditionModel
from minidiff.reference import FLAVOURS, TEXT_HIDDEN


def attention_forward_einops(self, x, context=None, mask=None):
    """Attention.forward (unsliced) with the heads split and merged by rearrange."""
    context = x if context is None else context
    q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.num_heads)
    k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.num_heads)
    v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.num_heads)
    out = attention(q, k, v, mask=mask, upcast=self.upcast)
    return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


def transformer_forward_plain(self, x, context):
    """SpatialTransformer.forward with permute/reshape (the code before einops)."""
    B, C, H, W = x.shape
    h = self.norm(x)
    if self.use_linear_projection:
        h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, H*W, C)
    else:
        h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C)
    for block in self.transformer_blocks:
        h = block(h, context)
    if self.use_linear_projection:
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
    else:
        h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous())
    return h + x


# The forwards each variant runs; "plain" is the baseline of every ratio.
VARIANTS = {
    "plain": {Attention: Attention.forward, SpatialTransformer: transformer_forward_plain},
    "minidiff": {Attention: Attention.forward, SpatialTransformer: SpatialTransformer.forward},
    "all einops": {Attention: attention_forward_einops, SpatialTransformer: SpatialTransformer.forward},
}


def use(variant: str) -> None:
    for cls, forward in VARIANTS[variant].items():
        cls.forward = forward


def in_variants(fn) -> dict:
    def run(variant):
        def call():
            use(variant)
            return fn()
        return call
    return {name: run(name) for name in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    dev = args.device
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    sd_attn, sd_cross = Attention(320, 8, 40).to(dev), Attention(320, 8, 40, context_dim=768).to(dev)
    sd_block = SpatialTransformer(320, 8, 768).to(dev)
    tiny_attn, tiny_block = Attention(32, 4, 8).to(dev), SpatialTransformer(32, 4, TEXT_HIDDEN, groups=8).to(dev)
    tokens, image, text = rand(2, 1024, 320), rand(2, 320, 32, 32), rand(2, 77, 768)
    tiny_tokens, tiny_image, tiny_text = rand(2, 64, 32), rand(2, 32, 8, 8), rand(2, 77, TEXT_HIDDEN)
    unets = {}
    for flavour in ("sd1", "sd2"):
        cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                   cross_attention_dim=TEXT_HIDDEN, **FLAVOURS[flavour]["unet"])
        unets[flavour] = UNet2DConditionModel.from_config(cfg).to(dev).eval()
    x_t, t = rand(2, 4, 8, 8), torch.tensor([500, 500], device=dev)

    cases = {
        "Attention self (2, 1024, 320), 8 heads of 40": lambda: sd_attn(tokens),
        "Attention cross, 77 keys of 768": lambda: sd_cross(tokens, text),
        "SpatialTransformer (2, 320, 32, 32)": lambda: sd_block(image, text),
        "Attention tiny (2, 64, 32), 4 heads of 8": lambda: tiny_attn(tiny_tokens),
        "SpatialTransformer tiny (2, 32, 8, 8)": lambda: tiny_block(tiny_image, tiny_text),
        "tiny UNet sd1 (2, 4, 8, 8)": lambda: unets["sd1"](x_t, t, tiny_text).sample,
        "tiny UNet sd2 (2, 4, 8, 8)": lambda: unets["sd2"](x_t, t, tiny_text).sample,
    }
    print(describe_machine(dev))
    print(f"median of {args.repeats} interleaved runs per variant, warm-up excluded; ratios to 'plain'\n")
    print("| forward | plain ms | minidiff / plain | all einops / plain |\n|---|---|---|---|")
    with torch.no_grad():
        for name, fn in cases.items():
            outs = {variant: call() for variant, call in in_variants(fn).items()}
            assert all(torch.equal(o, outs["plain"]) for o in outs.values()), f"{name}: the variants disagree"
            ms = interleaved_median_times(in_variants(fn), dev, warmup=3, repeats=args.repeats)
            print(f"| {name} | {1e3 * ms['plain']:.3f} | {ms['minidiff'] / ms['plain']:.3f} | "
                  f"{ms['all einops'] / ms['plain']:.3f} |")
    use("minidiff")


if __name__ == "__main__":
    main()

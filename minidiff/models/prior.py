"""The diffusion prior of unCLIP (Karlo) and Kandinsky 2.2 (diffusers' `PriorTransformer`).

unCLIP (Ramesh et al. 2022, "Hierarchical Text-Conditional Image Generation with CLIP Latents")
generates an image in two stages: a *prior* turns the caption y into a CLIP image embedding z_i,
and a decoder turns z_i into pixels. Section 2.1 describes the diffusion prior implemented here:

    "a decoder-only Transformer with a causal attention mask on a sequence consisting of, in
    order: the encoded text, the CLIP text embedding, an embedding for the diffusion timestep,
    the noised CLIP image embedding, and a final embedding whose output from the Transformer is
    used to predict the unnoised CLIP image embedding."

It predicts z_i itself, not the noise: L_prior = E || f_theta(z_i^(t), t, y) - z_i ||^2 (sec. 2.1).

Notation (B batch, D = num_attention_heads * attention_head_dim the transformer width, 2048 in
both official priors; E = embedding_dim, the CLIP width: 1280 for Kandinsky 2.2, 768 for Karlo):

    encoder_hidden_states  (B, 77, E)   the encoded text: CLIP text encoder's last hidden states
    proj_embedding         (B, E)       z_t, the CLIP text embedding (projected, pooled)
    timestep               t            the diffusion step
    hidden_states          (B, E)       z_i^(t), the noisy (normalised) CLIP image embedding
    predicted_image_embedding (B, E)    the prediction of z_i (still normalised: see
                                        `post_process_latents`)

The sequence, each token brought to width D, plus a learned positional embedding over all of it:

    index 0..76   encoder_hidden_states_proj(text states)          77 text tokens
    index 77      embedding_proj(text embedding)                   (optionally LayerNorm-ed first)
    index 78      time_embedding(sinusoid(t))                      cos first, as in guided-diffusion
    index 79      proj_in(noisy image embedding)
    index 80      prd_embedding, a learned vector                  "the final embedding"
    -> num_layers pre-LayerNorm blocks -> norm_out -> token 80 -> proj_to_clip_embeddings

So the sequence has num_embeddings + additional_embeddings = 77 + 4 = 81 tokens.

The attention mask, and where diffusers differs from the original code:
    With `attention_mask` (B, 77) given (1 = real text token, 0 = padding), the additive bias is
        (1 - mask) * -10000 on the key axis, zeros for the 4 extra tokens,
        plus the causal mask: -10000 above the diagonal (token i sees tokens 0..i),
    so padded text tokens and later tokens are hidden. This is what the Kandinsky and unCLIP
    pipelines pass at every step. With `attention_mask=None` diffusers applies NO mask at all,
    not even the causal one: every token sees every token. minidiff matches diffusers. The
    Karlo and Kandinsky originals always apply the causal mask (and -inf where diffusers uses
    -10000); to get their behaviour without padding, pass an all-ones attention_mask. -10000
    and -inf give the same softmax unless a whole row is masked, where -inf would give NaN.

clip_mean / clip_std: the prior works on CLIP image embeddings normalised per feature,
(z - mean) / std; `post_process_latents` undoes that. They are checkpoint keys stored as
parameters (zeros until loaded) but forward never uses them: a training loop should call
`freeze_clip_stats()` (DDP refuses parameters that want gradients and never get one).

Options: every config key of diffusers' PriorTransformer is read. The two official priors
(kakaobrain/karlo-v1-alpha, kandinsky-community/kandinsky-2-2-prior) leave all but the sizes at
diffusers' defaults. Also implemented: the optional LayerNorms `norm_in_type` and
`embedding_proj_norm_type`, the sizes `time_embed_dim`, `embedding_proj_dim`, `clip_embed_dim` and
`time_embed_act_fn`. Refused, with one sentence: the values that change the token layout (Shap-E's
`encoder_hid_proj_type=None`, `added_emb_type=None`, `additional_embeddings` other than 4) and
dropout (0 in both official priors).

References: the unCLIP paper (arxiv.org/abs/2204.06125), section 2.1; Karlo's code
(github.com/kakaobrain/karlo, the `PriorTransformer` of its xf.py); diffusers'
models/transformers/prior_transformer.py, whose checkpoint keys the attribute names reproduce
and which tests/test_prior.py compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import InputError
from minidiff.loading import PretrainedMixin
from minidiff.models.attention import Attention
from minidiff.models.embeddings import TimestepEmbedding, Timesteps, batch_timesteps

# The additive mask value of diffusers' prior (Karlo's original code uses -inf). Finite, so a row
# with every key masked still has a defined softmax; exp(-10000) is 0 in fp32, fp16 and bf16.
MASK_VALUE = -10000.0

# The extra tokens after the text: text embedding, timestep, noisy image embedding, prd token.
EXTRA_TOKENS = 4


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class PriorTransformerConfig:
    """The keys of `prior/config.json`, with diffusers' defaults (which are Karlo's sizes).

    Unlike the UNet's config, `attention_head_dim` here is what its name says: the width of one
    head (64), and `num_attention_heads` the head count (32).
    """

    num_attention_heads: int = 32
    attention_head_dim: int = 64
    num_layers: int = 20
    embedding_dim: int = 768  # E: CLIP width of the text states and image embeddings
    num_embeddings: int = 77  # text tokens
    additional_embeddings: int = EXTRA_TOKENS
    dropout: float = 0.0
    time_embed_act_fn: str = "silu"
    norm_in_type: str | None = None  # "layer": LayerNorm over the sequence before the blocks
    embedding_proj_norm_type: str | None = None  # "layer": LayerNorm on proj_embedding
    encoder_hid_proj_type: str | None = "linear"
    added_emb_type: str | None = "prd"
    time_embed_dim: int | None = None  # hidden width of the time MLP; None: D
    embedding_proj_dim: int | None = None  # width of proj_embedding; None: E
    clip_embed_dim: int | None = None  # width of the output; None: E

    def __post_init__(self):
        layer_norm_or_none = (None, "layer")
        for key, accepted in (("norm_in_type", layer_norm_or_none),
                              ("embedding_proj_norm_type", layer_norm_or_none),
                              ("encoder_hid_proj_type", ("linear",)),
                              ("added_emb_type", ("prd",)),
                              ("additional_embeddings", (EXTRA_TOKENS,)),
                              ("dropout", (0, 0.0))):
            value = getattr(self, key)
            if value not in accepted:
                raise InputError(
                    f"PriorTransformer config option {key}={value!r} is not supported: minidiff implements "
                    f"the unCLIP / Kandinsky 2.2 prior (text, text embedding, time, image, prd token; no "
                    f"dropout), where {key} is one of {list(accepted)}; other values belong to other "
                    "models (e.g. Shap-E's prior)."
                )

    @property
    def inner_dim(self) -> int:  # D, the transformer width
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_tokens(self) -> int:  # 81 for both official priors
        return self.num_embeddings + self.additional_embeddings


def causal_mask(num_tokens: int, device=None) -> torch.Tensor:
    """(1, N, N) float32: 0 where token i may see token j (j <= i), MASK_VALUE above the diagonal."""
    return torch.full((num_tokens, num_tokens), MASK_VALUE, device=device).triu(1)[None]


# ----------------------------------------------------------------------------------------------
# The transformer block: GPT-2 / CLIP order, as in Karlo's `ResidualAttentionBlock`
#     x = x + attn1(norm1(x))      self-attention over all 81 tokens (biases on q, k, v)
#     x = x + ff(norm3(x))         Linear(D, 4D) -> exact GELU -> Linear(4D, D)
# The names follow diffusers' BasicTransformerBlock, which the prior builds without cross-
# attention: hence norm1 then norm3 (there is no norm2/attn2), and ff.net.0.proj / ff.net.2.
# The SD block in transformer.py does not fit: it has cross-attention, a GEGLU feed-forward and
# no q/k/v biases.


class GELUProjection(nn.Module):
    """Linear then exact (erf) GELU: diffusers' `GELU` activation module, key `ff.net.0.proj`."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # "net.1" is a parameter-free Dropout (p = 0), kept so the output Linear is "net.2".
        self.net = nn.ModuleList([GELUProjection(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class PriorTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5
        self.attn1 = Attention(dim, num_heads, head_dim, bias=True)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B, N, D); mask: None or additive (B, 1, N, N), shared by the heads
        x = x + self.attn1(self.norm1(x), mask=mask)
        return x + self.ff(self.norm3(x))


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class PriorTransformerOutput:
    """What `prior(..., return_dict=True)` returns: `.predicted_image_embedding`, and `[0]`."""

    predicted_image_embedding: torch.Tensor

    def __getitem__(self, index):
        return (self.predicted_image_embedding,)[index]


class PriorTransformer(nn.Module, PretrainedMixin):
    """prior(z_i^(t), t, text_embedding, text_states, text_mask).predicted_image_embedding -> (B, E)."""

    config_class = PriorTransformerConfig

    def __init__(self, config: PriorTransformerConfig):
        super().__init__()
        self.config = c = config
        D, E = c.inner_dim, c.embedding_dim

        self.positional_embedding = nn.Parameter(torch.zeros(1, c.num_tokens, D))  # learned, over all tokens
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, D))  # the "final embedding" of sec. 2.1
        # Normalisation statistics of the CLIP image embeddings; zeros until a checkpoint is loaded.
        self.clip_mean = nn.Parameter(torch.zeros(1, c.clip_embed_dim or E))
        self.clip_std = nn.Parameter(torch.zeros(1, c.clip_embed_dim or E))

        # t -> D-wide sinusoid, cosines first, frequencies exp(-ln(10000) * i / (D/2)) (shift 0)
        self.time_proj = Timesteps(D, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(D, c.time_embed_dim or D, act=c.time_embed_act_fn, out_dim=D)
        self.proj_in = nn.Linear(E, D)  # noisy image embedding -> one token
        self.embedding_proj_norm = nn.LayerNorm(c.embedding_proj_dim or E) if c.embedding_proj_norm_type else None
        self.embedding_proj = nn.Linear(c.embedding_proj_dim or E, D)  # text embedding -> one token
        self.encoder_hidden_states_proj = nn.Linear(E, D)  # text states -> 77 tokens
        self.norm_in = nn.LayerNorm(D) if c.norm_in_type else None

        self.transformer_blocks = nn.ModuleList(
            [PriorTransformerBlock(D, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers)]
        )
        self.norm_out = nn.LayerNorm(D)
        self.proj_to_clip_embeddings = nn.Linear(D, c.clip_embed_dim or E)

        # Not saved (persistent=False, as in diffusers): the checkpoint has no such key.
        self.register_buffer("causal_attention_mask", causal_mask(c.num_tokens), persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int | float,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """hidden_states z_i^(t) (B, E), timestep (a number, 0-d or (B,) tensor), proj_embedding
        (B, embedding_proj_dim), encoder_hidden_states (B, 77, E), attention_mask (B, 77) of
        1/True for real text tokens or None (then no mask at all: see the module docstring)
        -> `.predicted_image_embedding` (B, clip_embed_dim), or the tuple of it with
        return_dict=False.

        A Python number as timestep becomes an integer (500.7 -> 500), as in diffusers; tensors
        keep their dtype.
        """
        B = self._check_inputs(hidden_states, proj_embedding, encoder_hidden_states, attention_mask)
        dtype = self.dtype
        t = batch_timesteps(timestep, B, hidden_states.device, number_dtype=torch.long)  # (B,); 500.7 -> 500

        # 1. One D-wide token per input (unCLIP sec. 2.1, in that order).
        text = self.encoder_hidden_states_proj(encoder_hidden_states)  # (B, 77, D)
        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        text_embedding = self.embedding_proj(proj_embedding)[:, None]  # (B, 1, D)
        # The sinusoid is computed in fp32, then cast to the weights' dtype.
        time = self.time_embedding(self.time_proj(t).to(dtype))[:, None]  # (B, 1, D)
        z_t = self.proj_in(hidden_states)[:, None]  # (B, 1, D)
        prd = self.prd_embedding.to(dtype).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([text, text_embedding, time, z_t, prd], dim=1)  # (B, 81, D)
        x = x + self.positional_embedding.to(dtype)  # (1, 81, D) broadcast over the batch

        # 2. The decoder-only transformer, causal and padding-aware when a text mask is given.
        mask = None if attention_mask is None else self.attention_bias(attention_mask, dtype)  # (B, 1, 81, 81)
        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, mask)  # (B, 81, D)

        # 3. The output at the last (prd) token is the prediction of z_i.
        z_0 = self.proj_to_clip_embeddings(self.norm_out(x)[:, -1])  # (B, clip_embed_dim)
        return PriorTransformerOutput(z_0) if return_dict else (z_0,)

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Text mask (B, 77), 1 = keep -> additive bias (B, 1, 81, 81) over (query, key).

        Padding bias (1 - m) * -10000 on the text keys, 0 on the 4 extra keys (always visible),
        plus the causal mask; the head axis is 1 and broadcasts (diffusers repeats it per head).
        Summed in fp32, then cast, as diffusers does.
        """
        padding = (1 - attention_mask.to(dtype)) * MASK_VALUE  # (B, 77)
        padding = F.pad(padding, (0, EXTRA_TOKENS), value=0.0)  # (B, 81)
        bias = padding[:, None, :] + self.causal_attention_mask  # (B, 81, 81): rows query, columns key
        return bias.to(dtype)[:, None]  # (B, 1, 81, 81)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation of CLIP image embeddings: z = z_normalised * clip_std + clip_mean.
        (B, clip_embed_dim) -> (B, clip_embed_dim); the statistics follow the latents' device."""
        device = prior_latents.device
        return prior_latents * self.clip_std.to(device) + self.clip_mean.to(device)

    def freeze_clip_stats(self) -> PriorTransformer:
        """Stop clip_mean / clip_std from asking for gradients (call before training).

        They are parameters only because diffusers stores them so; forward never uses them, so
        an optimizer would leave them alone, but DistributedDataParallel raises an error for
        parameters that require a gradient and never receive one."""
        self.clip_mean.requires_grad_(False)
        self.clip_std.requires_grad_(False)
        return self

    def _init_non_persistent_buffers(self) -> None:
        # Built on the meta device by the loader: the causal mask is recomputed (it is not saved).
        if self.causal_attention_mask.is_meta:
            self.causal_attention_mask = causal_mask(self.config.num_tokens, device=self.positional_embedding.device)
        super()._init_non_persistent_buffers()

    # -- input checks ------------------------------------------------------------------------------

    def _check_inputs(self, hidden_states, proj_embedding, encoder_hidden_states, attention_mask) -> int:
        c = self.config
        E, P = c.embedding_dim, c.embedding_proj_dim or c.embedding_dim
        if hidden_states.ndim != 2 or hidden_states.shape[1] != E:
            raise InputError(
                f"hidden_states (the noisy image embedding) must have shape (batch, {E}), "
                f"got {tuple(hidden_states.shape)}."
            )
        B = hidden_states.shape[0]
        if proj_embedding.shape != (B, P):
            raise InputError(
                f"proj_embedding (the CLIP text embedding) must have shape ({B}, {P}), "
                f"got {tuple(proj_embedding.shape)}."
            )
        if encoder_hidden_states is None:
            raise InputError(
                "This prior needs encoder_hidden_states, the text encoder's last hidden states "
                f"(batch, {c.num_embeddings}, {E})."
            )
        if encoder_hidden_states.shape != (B, c.num_embeddings, E):
            raise InputError(
                f"encoder_hidden_states must have shape ({B}, {c.num_embeddings}, {E}): the prior's positional "
                f"embedding covers exactly {c.num_embeddings} text tokens (pad the prompt to that length); "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        if attention_mask is not None and attention_mask.shape != (B, c.num_embeddings):
            raise InputError(
                f"attention_mask must have shape ({B}, {c.num_embeddings}) (1 for real text tokens, 0 for "
                f"padding), got {tuple(attention_mask.shape)}."
            )
        for name, x in (("hidden_states", hidden_states), ("proj_embedding", proj_embedding),
                        ("encoder_hidden_states", encoder_hidden_states)):
            if x.dtype != self.dtype:
                raise InputError(f"The prior's weights are {self.dtype}, but {name} is {x.dtype}; "
                                 f"cast the inputs with .to({self.dtype}).")
        return B

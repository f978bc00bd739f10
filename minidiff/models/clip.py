"""CLIP text and vision encoders (the conditioning models of Stable Diffusion and Kandinsky).

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") trains a text transformer and an image transformer so that matching captions and
images land close together. Diffusion models reuse the trained halves:

    SD 1.x       CLIPTextModel, OpenAI ViT-L/14 text tower (hidden 768, 12 layers, quick_gelu)
    SD 2.x       CLIPTextModel, OpenCLIP ViT-H/14 text tower (hidden 1024, 23 of its 24 layers, gelu)
    Kandinsky    CLIPTextModelWithProjection + CLIPVisionModelWithProjection (the prior maps the
                 projected text embedding to the projected image embedding)

Both towers are the same pre-LayerNorm transformer encoder (Vaswani et al. 2017; GPT-2 layer
order):

    x = x + attn(layer_norm1(x))            # causal for text, bidirectional for images
    x = x + mlp(layer_norm2(x))             # fc1 -> quick_gelu or gelu -> fc2

    text:   tokens + positions -> encoder -> final_layer_norm;  pooled = state at the EOS token
    vision: [CLS] + patches + positions -> pre_layrnorm -> encoder;  pooled = post_layernorm(CLS)
    projections (no bias): text_embeds = text_projection(pooled), image_embeds = visual_projection(pooled)

Notable details, each checked against transformers in tests/test_clip.py:
    - Module names equal transformers' checkpoint keys ("text_model.encoder.layers.0.self_attn.q_proj",
      "vision_model.pre_layrnorm" with its historical typo), so hub checkpoints load unchanged.
    - The pooled EOS position follows transformers' two rules: configs with the legacy
      `eos_token_id == 2` take argmax(input_ids) (the EOS token 49407 is the largest id in the
      CLIP vocabulary); newer configs take the first position whose id equals eos_token_id.
    - `output_hidden_states=True` returns (embeddings, layer 1, ..., layer L), the raw outputs
      before final_layer_norm, for "clip skip": a pipeline takes hidden_states[-(clip_skip + 1)]
      and applies `text_model.final_layer_norm` itself.
    - Outputs are small dataclasses read like transformers' ones: `out.last_hidden_state`,
      `out[0]` (the first field that is set) or `out["image_embeds"]`.
    - Positions 0..N-1 are read as the first N rows of the position table, so there is no
      `position_ids` buffer: transformers keeps a non-persistent one, which checkpoints written
      by older transformers 4.x versions still contain; those keys are dropped on load.
    - transformers >= 5 saves a bare CLIPTextModel without the "text_model." prefix that every hub
      checkpoint has; both layouts load, and save_pretrained writes the hub layout.

References:
    CLIP paper https://arxiv.org/abs/2103.00020, OpenAI code github.com/openai/CLIP (model.py),
    transformers models/clip/modeling_clip.py (the reference for the parity tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import InputError
from minidiff.loading import PretrainedMixin
from minidiff.models.attention import attention
from minidiff.single_file import SingleFileMixin

# ----------------------------------------------------------------------------------------------
# Configs: field names are the config.json keys; defaults are transformers' defaults.


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 1


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


# Keys transformers writes into config.json that do not change the forward pass: training-only
# settings (dropout, init scales), bookkeeping, and the generic PretrainedConfig fields that
# transformers 4.x wrote into every file. They are dropped without a warning.
TRANSFORMERS_CONFIG_IGNORE = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "attention_dropout", "dropout", "initializer_range", "initializer_factor",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "is_decoder",
    "is_encoder_decoder", "add_cross_attention", "tie_word_embeddings", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "pruned_heads", "torchscript", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
)


# ----------------------------------------------------------------------------------------------
# Outputs


class _Output:
    """Read like transformers' outputs: `out.name`, `out["name"]`, or `out[i]`, where integer
    indices count only the fields that are set (so `out[0]` is the first output and, with
    output_hidden_states=True, `out[-1]` is the hidden-states tuple, as diffusers expects)."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return tuple(v for v in values if v is not None)


@dataclass
class CLIPTextOutput(_Output):
    last_hidden_state: torch.Tensor  # (B, N, D), after final_layer_norm
    pooler_output: torch.Tensor  # (B, D), the state at the EOS token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L + 1 of (B, N, D)


@dataclass
class CLIPTextProjectionOutput(_Output):
    text_embeds: torch.Tensor  # (B, projection_dim)
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CLIPVisionProjectionOutput(_Output):
    image_embeds: torch.Tensor  # (B, projection_dim)
    last_hidden_state: torch.Tensor  # (B, 1 + num_patches, D), before post_layernorm
    hidden_states: tuple[torch.Tensor, ...] | None = None


# ----------------------------------------------------------------------------------------------
# The transformer encoder shared by both towers


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # OpenAI's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, section 2): the OpenAI
    # CLIP models were trained with it, so they must run with it. OpenCLIP models use exact gelu.
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise InputError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}.")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        H, d = self.num_heads, self.head_dim
        q = self.q_proj(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        k = self.k_proj(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        v = self.v_proj(x).view(B, N, H, d).transpose(1, 2)  # (B, H, N, d)
        out = attention(q, k, v, mask=mask, causal=causal)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, H*d)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise InputError(f"hidden_act {hidden_act!r} is not supported; CLIP checkpoints use one of {sorted(ACTIVATIONS)}.")
        self.act = ACTIVATIONS[hidden_act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.self_attn = CLIPAttention(D, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(D, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, mask=None, causal=False, output_hidden_states=False):
        """Returns the last layer's output and, if asked, (input, layer 1, ..., layer L)."""
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask=mask, causal=causal)
            if output_hidden_states:
                hidden_states.append(x)
        return x, (tuple(hidden_states) if output_hidden_states else None)


# ----------------------------------------------------------------------------------------------
# Text tower


class CLIPTextEmbeddings(nn.Module):
    # forward reads position_embedding.weight itself, not through the Embedding's forward: CPU
    # offload (minidiff/memory/offload/sequential.py) must move this module with its children.
    reads_child_weights_directly = True

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        N = input_ids.shape[1]
        # Learned absolute positions 0..N-1: the rows of the position table, no ids needed.
        return self.token_embedding(input_ids) + self.position_embedding.weight[:N]  # (B, N, D)


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        max_len = self.config.max_position_embeddings
        if input_ids.dim() != 2:
            raise InputError(f"input_ids should be (batch, tokens), got shape {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > max_len:
            raise InputError(
                f"input_ids has {input_ids.shape[1]} tokens, but this text encoder has only "
                f"{max_len} positions (max_position_embeddings). Truncate the prompt to {max_len} "
                f"tokens (the tokenizer does this with truncation=True, max_length={max_len})."
            )
        mask = None
        if attention_mask is not None:
            is_token = attention_mask.to(device=input_ids.device, dtype=torch.bool)  # (B, N)
            # With left padding, query i of a leading pad has only padding keys 0..i: softmax over
            # nothing is NaN, and 0 * NaN spreads it to every row. Such queries (outputs nobody
            # reads) may see their padding keys; all other queries see tokens only.
            sees_nothing = is_token.cumsum(dim=-1) == 0  # (B, N)
            mask = is_token[:, None, None, :] | sees_nothing[:, None, :, None]  # (B, 1, N, N) keys to keep
        x = self.embeddings(input_ids)  # (B, N, D)
        # Causal: token i sees tokens 0..i, as CLIP's text transformer was trained (GPT-style).
        x, hidden_states = self.encoder(x, mask=mask, causal=True, output_hidden_states=output_hidden_states)
        x = self.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(input_ids)]  # (B, D)
        return CLIPTextOutput(last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states)

    def eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of the EOS token whose state summarises the prompt."""
        if self.config.eos_token_id == 2:
            # Configs written before transformers PR #24773 say eos_token_id 2, which is wrong;
            # they rely on EOS (49407) being the largest id in the vocabulary.
            return input_ids.argmax(dim=-1)
        # The first EOS: padding may reuse the EOS id, so later ones are padding.
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# Vision tower (ViT, Dosovitskiy et al. 2020)


class CLIPVisionEmbeddings(nn.Module):
    # forward reads position_embedding.weight itself (see CLIPTextEmbeddings).
    reads_child_weights_directly = True

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(D) * D**-0.5)  # the learned [CLS] token
        # A conv with kernel = stride = patch size is a linear map of each non-overlapping patch.
        self.patch_embedding = nn.Conv2d(config.num_channels, D, kernel_size=p, stride=p, bias=False)
        num_positions = (config.image_size // p) ** 2 + 1  # patches + [CLS]
        self.position_embedding = nn.Embedding(num_positions, D)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B = pixel_values.shape[0]
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, num_patches, D), patches in row-major order
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + num_patches, D)
        return x + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic) checkpoint key
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, output_hidden_states=False):
        """Returns (last_hidden_state, pooled, hidden_states)."""
        c = self.config
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c.num_channels, c.image_size, c.image_size):
            raise InputError(
                f"pixel_values should be (batch, {c.num_channels}, {c.image_size}, {c.image_size}) for this "
                f"image encoder, got {tuple(pixel_values.shape)}. Resize (and centre-crop) the images "
                f"to {c.image_size}x{c.image_size} first, as CLIPImageProcessor does."
            )
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, 1 + num_patches, D)
        x, hidden_states = self.encoder(x, output_hidden_states=output_hidden_states)
        pooled = self.post_layernorm(x[:, 0])  # (B, D), the [CLS] token
        return x, pooled, hidden_states


# ----------------------------------------------------------------------------------------------
# Loading: the pieces the three public models share


class _CLIPPretrained(PretrainedMixin, SingleFileMixin):
    """transformers' file layout (config.json + model.safetensors) for the CLIP models."""

    weights_name = "model.safetensors"
    config_ignore = TRANSFORMERS_CONFIG_IGNORE
    default_dtype = "auto"  # transformers 5: the config's "dtype", else the file's (loading.resolve_dtype)
    model_type: str  # transformers' "model_type", needed for AutoModel / from_pretrained checks

    def config_extras(self) -> dict:
        dtype = next(self.parameters()).dtype
        return {"architectures": [type(self).__name__], "model_type": self.model_type,
                "dtype": str(dtype).removeprefix("torch.")}

    @classmethod
    def convert_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Bring the two checkpoint generations to minidiff's (= the hub's) key names."""
        # Older transformers versions saved the position-id buffers; they hold no learned weights.
        return {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}


# ----------------------------------------------------------------------------------------------
# Public models (names and forward arguments as in transformers)


class CLIPTextModel(nn.Module, _CLIPPretrained):
    """Token ids -> per-token states (the UNet's encoder_hidden_states) and the pooled EOS state."""

    config_class = CLIPTextConfig
    model_type = "clip_text_model"

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @classmethod
    def convert_state_dict(cls, state):
        state = super().convert_state_dict(state)
        if not any(k.startswith("text_model.") for k in state):
            # transformers >= 5 saves a bare CLIPTextModel as "embeddings...", while every hub
            # checkpoint (and transformers 4.x) says "text_model.embeddings...".
            state = {f"text_model.{k}": v for k, v in state.items()}
        return state

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        """input_ids: (B, N) int64; attention_mask: (B, N) of 1 (token) / 0 (padding).
        `return_dict=False` gives the output's tuple (its fields that are set, in order)."""
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(nn.Module, _CLIPPretrained):
    """CLIPTextModel plus the projection into CLIP's joint text-image space (text_embeds)."""

    config_class = CLIPTextConfig
    model_type = "clip_text_model"

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        out = CLIPTextProjectionOutput(text_embeds=self.text_projection(out.pooler_output),
                                       last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPVisionModelWithProjection(nn.Module, _CLIPPretrained):
    """Images (B, 3, S, S), normalised as CLIPImageProcessor does -> image_embeds (B, projection_dim)."""

    config_class = CLIPVisionConfig
    model_type = "clip_vision_model"

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        last, pooled, hidden_states = self.vision_model(pixel_values, output_hidden_states)
        out = CLIPVisionProjectionOutput(image_embeds=self.visual_projection(pooled),
                                         last_hidden_state=last, hidden_states=hidden_states)
        return out if return_dict else out.to_tuple()

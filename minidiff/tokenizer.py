"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library.

Text -> ids in five steps, each one line of `_build_backend` below:

    1. normalise      NFC, every run of whitespace -> one space, lower case
    2. pre-tokenise   CLIP's regex cuts the text into words: the two special strings, the
                      contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of
                      other non-space symbols; the spaces themselves are dropped
    3. bytes          each word's UTF-8 bytes become printable characters (GPT-2's byte table)
    4. BPE            merges, in rank order, inside one word; the last symbol of a word carries
                      the end-of-word marker "</w>", so "cat" and the "cat" in "cats" differ
    5. frame          <|startoftext|> words <|endoftext|>, cut to 77 positions (the EOS stays
                      last) and padded to 77 with the pad token

The special strings themselves ("<|endoftext|>", and "!" when it is the pad token) are matched in
the raw text before step 1, and become their own ids.

Files (the diffusers `tokenizer/` folder, or minidiff/data/clip-tokenizer in this repo):
    vocab.json               token -> id, 49408 entries; <|startoftext|> 49406, <|endoftext|> 49407
    merges.txt               "#version: 0.2" then one "left right" merge per line, by rank
    special_tokens_map.json  bos / eos / unk / pad tokens
    tokenizer_config.json    model_max_length (77), the same tokens, sometimes added_tokens_decoder
    tokenizer.json           (folders saved by transformers 5 have only this one and the config)

Pad token: SD 1.x pads with <|endoftext|> (49407); SD 2.x's folder says "!" (id 0), because
OpenCLIP pads with zeros. A side effect reproduced here for parity: with pad token "!", every "!"
in a prompt also becomes id 0 (diffusers issue #4153).

What transformers does and OpenAI's original does not: OpenAI cleans text with `ftfy.fix_text`
and `html.unescape` first ("&amp;" -> "&"); transformers 5 has no such step (and no ftfy), and
minidiff matches transformers exactly, which tests/test_tokenizer.py checks on a few hundred strings.

References: Radford et al. 2021 (CLIP), openai/CLIP `clip/simple_tokenizer.py`; Sennrich et al.
2016 (BPE); Radford et al. 2019 (GPT-2, the byte-level table); transformers `CLIPTokenizer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE

from minidiff.errors import InputError
from minidiff.loading import resolve_folder, write_json

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77  # CLIP's text transformer has 77 positions
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order

# OpenAI CLIP's word pattern (clip/simple_tokenizer.py). Case-sensitive here, which is harmless:
# the text is lower-cased before it is matched.
CLIP_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"]


class BatchEncoding(dict):
    """The tokenizer's output: a dict that also answers `out.input_ids`, like transformers'."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"The tokenizer output has no {name!r}; it has {sorted(self)}.") from None


# ----------------------------------------------------------------------------------------------
# Reading the files


def read_vocab(path: str | os.PathLike) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP tokenizer needs vocab.json, but {str(path)!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            vocab = json.load(f)
        except json.JSONDecodeError as err:
            raise InputError(f"{str(path)!r} is not valid JSON ({err}).") from err
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise InputError(f"{str(path)!r} should map each token (a string) to its id (an integer).")
    return vocab


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP tokenizer needs merges.txt, but {str(path)!r} does not exist.")
    merges = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line or (line_no == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise InputError(f"{str(path)!r} line {line_no} should hold two symbols separated by one space, got {line!r}.")
            merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """vocab, merges and added tokens of a `tokenizer.json` (what transformers 5 saves)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(f"{str(path)!r} does not hold a BPE model, so it is not a CLIP tokenizer.")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges, data.get("added_tokens", [])


def _token_parts(value: str | dict) -> tuple[str, dict]:
    """A special token from a config file: a plain string, or a dict of AddedToken fields."""
    if isinstance(value, dict):
        flags = {k: value[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special") if k in value}
        return value["content"], flags
    return str(value), {}


# ----------------------------------------------------------------------------------------------
# The tokenizer


class CLIPTokenizer:
    """CLIP BPE tokenizer with transformers' `CLIPTokenizer` behaviour, padded to 77 by default.

        tok = CLIPTokenizer.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="tokenizer")
        tok(["a photo of a cat"]).input_ids        # LongTensor (1, 77)

    Or from the two files directly: `CLIPTokenizer(vocab_file, merges_file, pad_token="!")`.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        merges_file: str | os.PathLike,
        pad_token: str = EOS,
        model_max_length: int = CONTEXT_LENGTH,
    ):
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
        self._setup(read_vocab(vocab_file), read_merges(merges_file), specials, [], model_max_length)

    # -- construction ---------------------------------------------------------------------------

    def _setup(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        specials: dict[str, str | dict],
        declared: list[dict],
        model_max_length: int,
    ) -> None:
        """`specials`: bos/eos/unk/pad as strings or AddedToken dicts. `declared`: AddedToken dicts
        a file lists explicitly (tokenizer_config's added_tokens_decoder, tokenizer.json's
        added_tokens); their flags win over those of `specials` with the same content."""
        self.vocab, self.merges = vocab, merges
        self.model_max_length = int(model_max_length)
        names = {}
        for name in NAMED_TOKENS:
            content, _ = _token_parts(specials.get(name) or (BOS if name == "bos_token" else EOS))
            if content not in vocab:
                raise InputError(f"The {name} {content!r} is not in the vocabulary (vocab.json).")
            names[name] = content
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.unk_token, self.pad_token = names["unk_token"], names["pad_token"]
        self.bos_token_id, self.eos_token_id = vocab[self.bos_token], vocab[self.eos_token]
        self.pad_token_id = vocab[self.pad_token]

        # The special strings become "added tokens": cut out of the raw text before normalisation.
        # `normalized=True` would match them in the lower-cased text instead ("<|STARTOFTEXT|>").
        # Flags are resolved as transformers 5 does: declared tokens first; then each named token
        # whose content is not declared, a plain string meaning normalized=False; for the same
        # content a later name overrides an earlier one (so SD 1.x's plain-string pad token
        # "<|endoftext|>" turns the eos token's normalized=True off).
        added: dict[str, dict] = {}
        for token in declared:
            content, flags = _token_parts(token)
            added[content] = flags
        declared_contents = set(added)
        for name in NAMED_TOKENS:
            if specials.get(name) is None:
                continue
            content, flags = _token_parts(specials[name])
            if content not in declared_contents:
                added[content] = flags
        self.added_tokens = [AddedToken(c, **{"special": True, "normalized": False, **f}) for c, f in added.items()]
        self._backend = _build_backend(vocab, merges, self.unk_token, self.added_tokens)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        local_files_only: bool | None = None,
        revision: str | None = None,
    ) -> "CLIPTokenizer":
        """Load a tokenizer folder, as transformers does: the folder itself by default (e.g.
        `minidiff/data/clip-tokenizer`), or `subfolder="tokenizer"` of a pipeline folder."""
        folder = resolve_folder(path_or_repo_id, subfolder, allow_patterns=TOKENIZER_FILES,
                                local_files_only=local_files_only, revision=revision)
        if not ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
            hint = (" It is a pipeline folder: pass subfolder=\"tokenizer\"." if (folder / "tokenizer").is_dir()
                    else "")
            raise FileNotFoundError(f"{str(folder)!r} holds no tokenizer files (vocab.json + merges.txt, "
                                    f"or tokenizer.json).{hint}")

        config = _read_optional_json(folder / "tokenizer_config.json")
        specials = {name: config[name] for name in NAMED_TOKENS if config.get(name) is not None}
        if "added_tokens_decoder" in config:
            # Newer folders declare the special tokens here; transformers then ignores
            # special_tokens_map.json.
            declared = [config["added_tokens_decoder"][i] for i in sorted(config["added_tokens_decoder"], key=int)]
        else:
            # Older folders (SD 1.x, SD 2.x): special_tokens_map.json overrides the config. This is
            # where SD 2.x's pad token "!" comes from; its tokenizer_config.json says <|endoftext|>.
            declared = []
            special_map = _read_optional_json(folder / "special_tokens_map.json")
            specials.update({name: special_map[name] for name in NAMED_TOKENS if special_map.get(name) is not None})

        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            vocab, merges = read_vocab(folder / "vocab.json"), read_merges(folder / "merges.txt")
        else:  # a folder saved by transformers 5: tokenizer.json only
            vocab, merges, file_added = _read_tokenizer_json(folder / "tokenizer.json")
            if "added_tokens_decoder" not in config:
                declared = sorted(file_added, key=lambda t: t["id"])

        tok = cls.__new__(cls)
        tok._setup(vocab, merges, specials, declared, config.get("model_max_length", CONTEXT_LENGTH))
        return tok

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json, a folder
        that both minidiff and transformers load back to the same tokenizer."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "vocab.json", "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(folder / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in self.merges)
        flags = {t.content: t.__getstate__() for t in self.added_tokens}
        named = {name: getattr(self, name) for name in NAMED_TOKENS}
        write_json({name: {k: v for k, v in flags[c].items() if k != "special"} for name, c in named.items()},
                   folder / "special_tokens_map.json")
        write_json({
            **named,
            # Listing the added tokens with their flags keeps them exact on reload.
            "added_tokens_decoder": {str(self.vocab[c]): flags[c] for c in flags},
            "model_max_length": self.model_max_length,
            "tokenizer_class": "CLIPTokenizer",
        }, folder / "tokenizer_config.json")

    # -- encoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of `text` as strings (without <|startoftext|> / <|endoftext|>)."""
        return self._backend.encode(_check_texts(text)[0], add_special_tokens=False).tokens

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = "max_length",
        max_length: int | None = None,
        truncation: bool | None = None,
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """Tokenise one string or a list of strings.

        padding      "max_length": to `max_length` (default `model_max_length`, 77);
                     "longest" or True: to the longest sequence of the batch; False: none.
        truncation   cut to `max_length` (<|endoftext|> stays the last token). The default, None,
                     truncates only when padding to "max_length", as diffusers' two calls expect:
                     `tok(prompt, padding="longest")` must show the untruncated length.
        return_tensors "pt": LongTensors (B, L); None: lists (a single string gives a flat list).
        """
        texts_list = _check_texts(texts)
        if padding is True:
            padding = "longest"
        if padding not in ("max_length", "longest", False, "do_not_pad"):
            raise InputError(f"padding must be 'max_length', 'longest', True or False, got {padding!r}.")
        if return_tensors not in ("pt", None):
            raise InputError(f"return_tensors must be 'pt' or None, got {return_tensors!r}.")
        if truncation is None:
            truncation = padding == "max_length"
        length = self.model_max_length if max_length is None else int(max_length)
        if (truncation or padding == "max_length") and length < 2:
            raise InputError(f"max_length must leave room for <|startoftext|> and <|endoftext|> (>= 2), got {length}.")

        encodings = self._backend.encode_batch(texts_list, add_special_tokens=False)
        input_ids = []
        for enc in encodings:
            words = enc.ids[: length - 2] if truncation else enc.ids  # keep room for BOS and EOS
            input_ids.append([self.bos_token_id, *words, self.eos_token_id])
        attention_mask = [[1] * len(ids) for ids in input_ids]

        if padding in ("max_length", "longest"):
            target = length if padding == "max_length" else max(len(ids) for ids in input_ids)
            for ids, mask in zip(input_ids, attention_mask):
                n_pad = max(0, target - len(ids))
                ids.extend([self.pad_token_id] * n_pad)
                mask.extend([0] * n_pad)

        if return_tensors == "pt":
            if len({len(ids) for ids in input_ids}) > 1:
                raise InputError(
                    "The sequences have different lengths, so they cannot be stacked into one tensor: "
                    "use padding='max_length' or 'longest' (and truncation=True for prompts longer "
                    f"than {length} tokens), or return_tensors=None."
                )
            return BatchEncoding(input_ids=torch.tensor(input_ids, dtype=torch.long),
                                 attention_mask=torch.tensor(attention_mask, dtype=torch.long))
        if isinstance(texts, str):
            return BatchEncoding(input_ids=input_ids[0], attention_mask=attention_mask[0])
        return BatchEncoding(input_ids=input_ids, attention_mask=attention_mask)

    # -- decoding -------------------------------------------------------------------------------

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Each "</w>" becomes a space, so words come back separated by spaces
        (punctuation too: "a cat, sitting" -> "a cat , sitting") and in lower case."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise InputError(f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}; use batch_decode.")
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(END_OF_WORD, " ").strip()

    def batch_decode(self, sequences: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"pad_token={self.pad_token!r} (id {self.pad_token_id}))")


# ----------------------------------------------------------------------------------------------
# Helpers


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str,
                   added_tokens: list[AddedToken]) -> Tokenizer:
    # Step 4: BPE inside one word; the word's last symbol carries "</w>".
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD,
                            unk_token=unk_token, fuse_unk=False))
    # Step 1: NFC, whitespace runs -> " ", lower case (OpenAI's `whitespace_clean` + `.lower()`).
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # Step 2: keep what CLIP's pattern matches, drop the rest (the spaces): invert=True turns the
    # matches into the pieces. Step 3: bytes -> printable characters. ByteLevel also splits with
    # GPT-2's own regex, as transformers' tokenizer does; after step 2 that only ever splits a
    # lower-cased "<|endoftext|>" typed in a prompt that was not matched as a special token.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()  # printable characters -> bytes -> UTF-8 text
    backend.add_special_tokens(added_tokens)
    return backend


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        return list(texts)
    if isinstance(texts, (list, tuple)) and not texts:
        raise InputError("The tokenizer got an empty list of prompts; give at least one string.")
    bad = texts if not isinstance(texts, (list, tuple)) else next(t for t in texts if not isinstance(t, str))
    raise InputError(
        f"The tokenizer takes a string or a list of strings, but got {type(bad).__name__} {bad!r:.60}."
    )


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise InputError(f"{str(path)!r} is not valid JSON ({err}).") from err

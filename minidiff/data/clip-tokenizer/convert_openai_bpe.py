"""Convert OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz` into Hugging Face `vocab.json` + `merges.txt`.

The gzip file ships with OpenAI CLIP (MIT licence) and with its PyPI repackaging `clip-anytorch`.
It holds a header line ('"bpe_simple_vocab_16e6.txt#version: 0.2') and then BPE merges, one "left right" pair per line,
in rank order. CLIP uses only the first 49152 - 256 - 2 = 48894 merges, and builds its vocabulary
in this order (see `SimpleTokenizer.__init__` in openai/CLIP, `clip/simple_tokenizer.py`):

    ids     0..255    the 256 byte-level characters (GPT-2's reversible byte -> unicode table)
    ids   256..511    the same 256 characters followed by the end-of-word marker "</w>"
    ids   512..49405  one token per merge: the two halves concatenated
    id    49406       <|startoftext|>
    id    49407       <|endoftext|>                                  (49408 tokens in all)

This is exactly the vocabulary of openai/clip-vit-large-patch14 on the hub (the SD 1.x and
SD 2.x tokenizers share it). The script also writes `special_tokens_map.json` and
`tokenizer_config.json` in the layout of the SD 1.x `tokenizer/` folder (pad token <|endoftext|>,
77 positions).

Usage (the input may be the .txt.gz itself or the clip-anytorch wheel that contains it):

    pip download --no-deps clip-anytorch -d /tmp/clipwheel
    python minidiff/data/clip-tokenizer/convert_openai_bpe.py /tmp/clipwheel/clip_anytorch-*.whl minidiff/data/clip-tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

NUM_TOKENS = 49152 + 256  # CLIP's vocab: 48894 merges + 2 * 256 byte tokens + 2 specials = 49408
NUM_MERGES = 49152 - 256 - 2  # the slice `merges[1 : 49152 - 256 - 2 + 1]` of the original code
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible table byte -> printable unicode character.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68 bytes
    (controls, space, soft hyphen, ...) map to chr(256), chr(257), ... in byte order. The order
    of the table (printable bytes first) is the order of CLIP's first 256 ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_bpe_text(source: Path) -> str:
    """The text of bpe_simple_vocab_16e6.txt from the .gz file or from a wheel that holds it."""
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(GZ_NAME)]
            if not names:
                raise FileNotFoundError(f"{source} does not contain {GZ_NAME}.")
            return gzip.decompress(wheel.read(names[0])).decode("utf-8")
    return gzip.decompress(source.read_bytes()).decode("utf-8")


def build_vocab_and_merges(bpe_text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = bpe_text.split("\n")
    # The first line is a header ('"bpe_simple_vocab_16e6.txt#version: 0.2'), not a merge.
    if "#version" not in lines[0]:
        raise ValueError(f"Expected a '#version' header line, found {lines[0][:60]!r}.")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError("The BPE file has fewer merges than CLIP uses, or a malformed merge line.")
    chars = list(byte_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens) == NUM_TOKENS, "CLIP's vocabulary has 49408 distinct tokens"
    return vocab, merges


def _special(content: str) -> dict:
    # The AddedToken fields of the SD 1.x special_tokens_map.json.
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def special_files(pad_token: str = EOS) -> tuple[dict, dict]:
    """special_tokens_map.json and tokenizer_config.json as the SD 1.x `tokenizer/` folder has them."""
    special_tokens_map = {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": pad_token,
        "unk_token": _special(EOS),
    }
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special(BOS)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS)},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS)},
    }
    return special_tokens_map, tokenizer_config


def write_folder(vocab: dict[str, int], merges: list[tuple[str, str]], out: Path, pad_token: str = EOS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special_tokens_map, tokenizer_config = special_files(pad_token)
    for name, data in [("special_tokens_map.json", special_tokens_map), ("tokenizer_config.json", tokenizer_config)]:
        with open(out / name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", type=Path, help=f"{GZ_NAME} or a clip-anytorch wheel containing it")
    parser.add_argument("out", type=Path, help="output folder (e.g. minidiff/data/clip-tokenizer)")
    args = parser.parse_args()
    vocab, merges = build_vocab_and_merges(read_bpe_text(args.source))
    write_folder(vocab, merges, args.out)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()

"""minidiff.CLIPTokenizer against transformers' CLIPTokenizer, built from the same files.

The vocabulary is the real one (minidiff/data/clip-tokenizer, converted from OpenAI's BPE file), so these
tests are about exact equality: ids, attention masks and decoded text must be identical, no
tolerance. Each tokenizer folder (SD 1.x and SD 2.x conventions, a newer and a transformers-5
layout) is written to tmp_path and loaded through both libraries' `from_pretrained`.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from minidiff.data import CLIP_TOKENIZER
from minidiff.tokenizer import CLIPTokenizer

FILES = CLIP_TOKENIZER  # package data: minidiff/data/clip-tokenizer
BOS_ID, EOS_ID = 49406, 49407

# transformers 5 has one CLIP tokenizer (the `tokenizers`-backed one); CLIPTokenizerFast is an
# alias of it. Test each distinct class, so a future split is covered too.
HF_CLASSES = list({cls.__name__: cls for cls in (transformers.CLIPTokenizerFast, transformers.CLIPTokenizer)}.values())


# ----------------------------------------------------------------------------------------------
# Prompts: hand-written edge cases plus deterministic random mixtures


SD_PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A majestic lion jumping from a big stone at night, 4k, highly detailed, trending on artstation",
    "portrait of a young woman, (masterpiece:1.2), best quality, ultra-detailed, 8k uhd, dslr, soft lighting",
    "a red circle and a blue square on a white background",
    "an oil painting of a fox in the style of Claude Monet, impressionism!!!",
    "cyberpunk city street at night, neon lights, rain, reflections, by Greg Rutkowski and Alphonse Mucha",
    "((ugly)), [blurry], {duplicate}, lowres, bad anatomy, bad hands, text, error, missing fingers",
    "a bowl of fruit --ar 16:9 --v 5",
    "photo of a cat wearing a hat, f/1.8, 85mm, ISO 100, 1/200s",
    "A CASTLE ON A HILL. SUNSET. DRAMATIC SKY!",
]

EDGE_CASES = [
    "",
    " ",
    "\t\n  \r\n",
    "a",
    "!",
    "!!!",
    "! !! !!!",
    "hello world!",
    "it's a dog's life, isn't it? they're here, we've been, I'm done, you'll see, he'd go",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "o'clock 'quoted' ''double'' rock'n'roll",
    "tabs\tand\nnewlines\r\nand   many    spaces",
    "   leading and trailing   ",
    "numbers 0 1 12 123 3.14159 1,000,000 2024-01-31 10:45pm",
    "café naïve résumé façade Ångström über straße",
    "cafe\u0301 (combining accent, NFC makes it one character)",
    "ﬁne ligature, ½ fraction, ² superscript, Ⅻ roman, ① circled, ０１２ full width digits",
    "ＡＢＣ full width letters, ℌ𝔢𝔩𝔩𝔬 math letters",
    "日本語のテキスト、東京タワー",
    "中文提示词：一只可爱的猫",
    "한국어 문장입니다",
    "Русский текст: кошка на крыше",
    "Ελληνικά ΟΔΟΣ ΣΑΣ",
    "العربية نص",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "İstanbul ǅ Σ final sigma ΌΣΟΣ",
    "zero\u200bwidth\u200cjoiners\u200d and\u00a0nbsp and\u3000ideographic and\u2028line sep",
    "control \x00 \x07 \x1b[31m \x7f chars",
    "html &amp; &lt;tag&gt; &#39; entities",
    "<|endoftext|>",
    "<|startoftext|> a cat <|endoftext|> after eos",
    "<|ENDOFTEXT|> <|StartOfText|> upper-case special strings",
    "a<|endoftext|>b",
    "<|endof text|> broken special",
    "punctuation ... ,,, ;;; ::: ??? !?! --- ___ *** ### @@@ $$$ %%% ^^^ &&& ~~~ `` \"\" '' ()[]{}<>",
    "url https://example.com/path?q=1&r=2#frag and email someone@example.org",
    "C++ / C# / F# / .NET / node.js / __init__.py",
    "mixedCASE camelCase snake_case kebab-case SCREAMING_CASE",
    "x" * 300,
    "word " * 120,
    "!" * 100,
    "a, " * 80,
    "🙂" * 40,
]

POOLS = {
    "word": ["cat", "dog", "astronaut", "horse", "castle", "forest", "portrait", "landscape", "neon", "sunset",
             "photorealistic", "octane", "render", "unreal", "engine", "detailed", "beautiful", "tiny", "giant"],
    "upper": ["CAT", "Dog", "HDR", "NASA", "McDonald", "iPhone", "DSLR", "LoRA", "SDXL", "UHD"],
    "accent": ["café", "naïve", "jalapeño", "crème", "brûlée", "Ærø", "São", "Zürich", "Łódź", "smörgåsbord"],
    "cjk": ["猫", "東京", "山水画", "さくら", "カメラ", "서울", "漢字", "水墨"],
    "emoji": ["😀", "🐱", "🌅", "🔥", "✨", "👍🏽", "🏳️‍🌈", "🇯🇵", "❤️", "🤖"],
    "punct": [",", ".", "!", "?", "!!", "...", ";", ":", "(", ")", "[", "]", "{", "}", "-", "--", "/", "|", "\"", "'",
              "*", "#", "@", "&", "%", "$", "+", "=", "~", "^", "<", ">", "_", "`", "(((", ")))", ":1.2)"],
    "number": ["0", "7", "42", "1024", "3.5", "8k", "4K", "1920x1080", "2001", "50%", "#1", "v1.5"],
    "contraction": ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "We'Ve", "rock'n'roll", "'s"],
    "space": [" ", "  ", "\t", "\n", " \n ", "\u00a0", "\u3000", "\r\n", "   \t   "],
    "special": ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|><|endoftext|>"],
}


def make_prompts(n_random: int = 220, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    kinds = list(POOLS)
    # "special" is rare on purpose: most prompts should test ordinary text.
    weights = [6, 2, 2, 2, 2, 4, 2, 2, 4, 0.3]
    prompts = []
    for i in range(n_random):
        n_pieces = rng.choice([1, 2, 3, 5, 8, 13, 30, 60])  # 30 and 60 pieces often exceed 77 tokens
        pieces = []
        for _ in range(n_pieces):
            piece = rng.choice(POOLS[rng.choices(kinds, weights)[0]])
            pieces.append(piece)
            pieces.append(rng.choice(["", " ", " ", " ", "  ", "\t"]))
        prompts.append("".join(pieces))
    return SD_PROMPTS + EDGE_CASES + prompts


PROMPTS = make_prompts()


# ----------------------------------------------------------------------------------------------
# Tokenizer folders in the layouts found on the hub


def _copy_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FILES / name, folder / name)
    return folder


def _write(folder: Path, name: str, data: dict) -> None:
    (folder / name).write_text(json.dumps(data, indent=2), encoding="utf-8")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    special_map = json.loads((FILES / "special_tokens_map.json").read_text())
    config = json.loads((FILES / "tokenizer_config.json").read_text())

    # SD 1.x: the files of minidiff/data/clip-tokenizer as they are (pad <|endoftext|>).
    sd1 = _copy_vocab(root / "sd1")
    shutil.copy(FILES / "special_tokens_map.json", sd1)
    shutil.copy(FILES / "tokenizer_config.json", sd1)

    # SD 2.x: special_tokens_map.json says pad "!" while tokenizer_config.json still says
    # <|endoftext|>; the map wins in these older folders.
    sd2 = _copy_vocab(root / "sd2")
    _write(sd2, "special_tokens_map.json", {**special_map, "pad_token": "!"})
    _write(sd2, "tokenizer_config.json", config)

    # Newer folders (transformers >= 4.34): the config declares added_tokens_decoder, and
    # special_tokens_map.json is then ignored (here it disagrees on purpose: pad "<|endoftext|>").
    modern = _copy_vocab(root / "modern")
    token = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    _write(modern, "tokenizer_config.json", {
        "added_tokens_decoder": {
            "0": {"content": "!", "normalized": False, **token},
            "49406": {"content": "<|startoftext|>", "normalized": True, **token},
            "49407": {"content": "<|endoftext|>", "normalized": False, **token},
        },
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
    })
    _write(modern, "special_tokens_map.json", special_map)

    # What transformers 5 itself saves: tokenizer.json + tokenizer_config.json, no vocab.json.
    saved = root / "transformers5"
    transformers.CLIPTokenizer.from_pretrained(str(sd2)).save_pretrained(str(saved))
    assert not (saved / "vocab.json").exists()
    return {"sd1": sd1, "sd2": sd2, "modern": modern, "transformers5": saved}


@pytest.fixture(scope="module")
def hf_tokenizers(folders):
    return {(name, cls.__name__): cls.from_pretrained(str(path)) for name, path in folders.items() for cls in HF_CLASSES}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: CLIPTokenizer.from_pretrained(path, subfolder=None) for name, path in folders.items()}


# ----------------------------------------------------------------------------------------------
# The files


def test_vocab_files_are_clips():
    vocab = json.loads((FILES / "vocab.json").read_text(encoding="utf-8"))
    merges = (FILES / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 49152 - 256 - 2
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    # OpenAI's order: 256 byte characters, the same with "</w>", then one token per merge.
    chars = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])[:256]]
    assert all(vocab[c + "</w>"] == 256 + i for i, c in enumerate(chars))
    assert chars[0] == "!" and chars[255] == chr(256 + 67)  # 188 printable bytes, then 68 shifted ones
    assert all(vocab["".join(m.split(" "))] == 512 + i for i, m in enumerate(merges[1:]))
    tok = CLIPTokenizer.from_pretrained(FILES, subfolder=None)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49408, BOS_ID, EOS_ID, EOS_ID)
    assert tok.model_max_length == 77
    # The ids OpenAI's SimpleTokenizer gives (checked against it when the files were converted).
    assert tok("a photo of a cat", padding=False, return_tensors=None).input_ids == [
        BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]


# ----------------------------------------------------------------------------------------------
# Parity


def test_prompt_set_is_varied():
    assert len(PROMPTS) >= 200 and len(set(PROMPTS)) >= 200
    tok = CLIPTokenizer.from_pretrained(FILES, subfolder=None)
    lengths = [len(tok(p, padding=False, truncation=False, return_tensors=None).input_ids) for p in PROMPTS]
    assert sum(n > 77 for n in lengths) >= 20, "too few prompts longer than 77 tokens"
    assert "" in PROMPTS and any("!" in p for p in PROMPTS)


@pytest.mark.parametrize("hf_class", [c.__name__ for c in HF_CLASSES])
@pytest.mark.parametrize("layout", ["sd1", "sd2", "modern", "transformers5"])
def test_ids_match_transformers(layout, hf_class, ours, hf_tokenizers):
    mine, ref = ours[layout], hf_tokenizers[(layout, hf_class)]
    assert (mine.pad_token, mine.pad_token_id) == (ref.pad_token, ref.pad_token_id)
    assert (mine.bos_token_id, mine.eos_token_id, mine.vocab_size) == (ref.bos_token_id, ref.eos_token_id, ref.vocab_size)
    assert mine.model_max_length == ref.model_max_length == 77

    # Untruncated, unpadded ids, one prompt at a time.
    mismatches = []
    for p in PROMPTS:
        a = mine(p, padding=False, truncation=False, return_tensors=None).input_ids
        b = ref(p, padding=False, truncation=False).input_ids
        if a != b:
            mismatches.append((p, a, b))
    assert not mismatches, f"{len(mismatches)}/{len(PROMPTS)} prompts differ, e.g. {mismatches[0]!r:.500}"

    # The diffusers call: one batch, padded and truncated to 77, as tensors.
    a = mine(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    b = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert a.input_ids.shape == (len(PROMPTS), 77) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    # Truncation keeps <|endoftext|> last; padding uses the pad id with mask 0.
    full = a.attention_mask.sum(1) == 77
    assert full.sum() >= 20 and (a.input_ids[full, -1] == EOS_ID).all()
    assert (a.input_ids[a.attention_mask == 0] == mine.pad_token_id).all()


def test_sd2_pad_token_is_exclamation_mark(ours):
    # SD 2.x pads with "!" (id 0), and transformers also turns every "!" in the prompt into
    # that special token (diffusers issue #4153); SD 1.x keeps "!!" as its own BPE token.
    sd1, sd2 = ours["sd1"], ours["sd2"]
    assert sd2.pad_token_id == 0
    assert sd1("hi!! there", return_tensors=None, padding=False).input_ids == [BOS_ID, 1883, 748, 997, EOS_ID]
    assert sd2("hi!! there", return_tensors=None, padding=False).input_ids == [BOS_ID, 1883, 0, 0, 997, EOS_ID]
    assert sd2("a cat", max_length=6).input_ids.tolist() == [[BOS_ID, 320, 2368, EOS_ID, 0, 0]]


def test_padding_longest_and_no_padding(ours, hf_tokenizers):
    batch = PROMPTS[:40]
    for layout in ("sd1", "sd2"):
        mine, ref = ours[layout], hf_tokenizers[(layout, HF_CLASSES[0].__name__)]
        # diffusers' truncation check: padding="longest" without truncation shows the full length.
        long_prompt = "word " * 120
        a = mine(long_prompt, padding="longest", return_tensors="pt").input_ids
        b = ref(long_prompt, padding="longest", return_tensors="pt").input_ids
        assert a.shape[1] > 77 and torch.equal(a, b)
        for truncation in (False, True):
            a = mine(batch, padding="longest", truncation=truncation, return_tensors="pt")
            b = ref(batch, padding="longest", truncation=truncation, return_tensors="pt")
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
            a = mine(batch, padding=False, truncation=truncation, return_tensors=None)
            b = ref(batch, padding=False, truncation=truncation)
            assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask
        # A shorter max_length for padding and truncation.
        a = mine(batch, padding="max_length", max_length=16, truncation=True)
        b = ref(batch, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


def test_decode_matches_transformers(ours, hf_tokenizers):
    for layout in ("sd1", "sd2"):
        mine, ref = ours[layout], hf_tokenizers[(layout, HF_CLASSES[0].__name__)]
        ids = mine(PROMPTS, padding="max_length", truncation=True).input_ids
        for skip in (True, False):
            got = mine.batch_decode(ids, skip_special_tokens=skip)
            want = ref.batch_decode(ids, skip_special_tokens=skip)
            bad = [(g, w) for g, w in zip(got, want) if g != w]
            assert not bad, f"{len(bad)} decodes differ (skip_special_tokens={skip}), e.g. {bad[0]!r:.300}"
        assert mine.decode(ids[0]) == mine.decode(ids[0].tolist()) == ref.decode(ids[0], skip_special_tokens=True)


def test_decode_round_trip():
    tok = CLIPTokenizer.from_pretrained(FILES, subfolder=None)
    # Plain words come back lower-cased, with single spaces; accents and CJK survive the bytes.
    for text in [SD_PROMPTS[0], SD_PROMPTS[3], "a cat, sitting", "A Photo   of a CAT", "café naïve 日本語 😀", "  tabs\tand\nnewlines "]:
        assert tok.decode(tok(text).input_ids[0]) == " ".join(text.lower().replace(",", " ,").split())
    assert tok.decode(tok("a cat").input_ids[0], skip_special_tokens=False).startswith("<|startoftext|>a cat <|endoftext|>")


# ----------------------------------------------------------------------------------------------
# Construction, saving, API


def test_direct_constructor_matches_transformers():
    for pad in ("<|endoftext|>", "!"):
        mine = CLIPTokenizer(FILES / "vocab.json", FILES / "merges.txt", pad_token=pad)
        ref = transformers.CLIPTokenizer(vocab=str(FILES / "vocab.json"), merges=str(FILES / "merges.txt"), pad_token=pad)
        a = mine(PROMPTS, max_length=77, truncation=True, padding="max_length")
        b = ref(PROMPTS, max_length=77, truncation=True, padding="max_length", return_tensors="pt")
        assert mine.pad_token_id == ref.pad_token_id
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


@pytest.mark.parametrize("layout", ["sd1", "sd2", "modern"])
def test_save_pretrained_round_trip(layout, ours, hf_tokenizers, tmp_path):
    mine = ours[layout]
    mine.save_pretrained(tmp_path / "saved")
    again = CLIPTokenizer.from_pretrained(tmp_path, subfolder="saved")
    ref_again = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "saved"))
    ref = hf_tokenizers[(layout, HF_CLASSES[0].__name__)]
    assert (again.pad_token_id, again.model_max_length) == (mine.pad_token_id, mine.model_max_length)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(again(PROMPTS).input_ids, want)
    assert torch.equal(ref_again(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids, want)


def test_call_api(folders, tmp_path):
    tok = CLIPTokenizer.from_pretrained(folders["sd1"].parent, subfolder="sd1")
    out = tok("a cat")
    assert out.input_ids.shape == (1, 77) and out["input_ids"] is out.input_ids
    assert out.attention_mask.tolist()[0][:5] == [1, 1, 1, 1, 0]
    assert tok(("a", "b")).input_ids.shape == (2, 77)
    assert tok("a cat", padding=False, return_tensors=None).input_ids == [BOS_ID, 320, 2368, EOS_ID]
    assert tok.tokenize("Hello, world!") == ["hello</w>", ",</w>", "world</w>", "!</w>"]
    # model_max_length comes from tokenizer_config.json.
    folder = _copy_vocab(tmp_path / "short")
    _write(folder, "tokenizer_config.json", {"model_max_length": 32})
    assert CLIPTokenizer.from_pretrained(folder, subfolder=None)("a cat").input_ids.shape == (1, 32)


def test_errors(folders, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(empty, subfolder=None)
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    shutil.copy(FILES / "vocab.json", only_vocab)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_pretrained(only_vocab, subfolder=None)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer(FILES / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match='pass subfolder="tokenizer"'):
        CLIPTokenizer.from_pretrained(SHAPES)  # a pipeline folder: its tokenizer is in tokenizer/
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTokenizer.from_pretrained(tmp_path / "nowhere", subfolder=None)

    tok = CLIPTokenizer.from_pretrained(folders["sd1"], subfolder=None)
    for bad in (None, 3, ["a", 3], [["a"]], [], b"bytes"):
        with pytest.raises(ValueError, match="string"):
            tok(bad)
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="everything")
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "word " * 100], padding=False)
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


SHAPES = Path(__file__).resolve().parents[1] / "weights" / "shapes"


def test_from_pretrained_reads_folders_as_transformers_does():
    """The folder itself by default, `subfolder=` inside a pipeline folder: the same calls give the
    same ids in transformers, and a pipeline root without subfolder is refused (transformers loads an empty vocabulary)."""
    import transformers

    calls = [((str(FILES),), {}), ((str(SHAPES),), {"subfolder": "tokenizer"})]
    for args, kwargs in calls:
        ours, theirs = CLIPTokenizer.from_pretrained(*args, **kwargs), transformers.CLIPTokenizer.from_pretrained(*args, **kwargs)
        texts = ["a red circle on a white background", "two words"]
        assert torch.equal(ours(texts, padding="max_length", return_tensors="pt").input_ids,
                           theirs(texts, padding="max_length", return_tensors="pt").input_ids)
    # At a pipeline root, transformers 5.24 returns a tokenizer with no vocabulary (2 entries, every
    # word becomes id 2) without a word; minidiff refuses and names the subfolder instead.
    assert len(transformers.CLIPTokenizer.from_pretrained(str(SHAPES))) < 10
    with pytest.raises(FileNotFoundError, match='subfolder="tokenizer"'):
        CLIPTokenizer.from_pretrained(SHAPES)

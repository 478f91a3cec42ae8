#!/usr/bin/env python3
"""Reference fixtures for the CLIP tokenizer tests (tests/clip_tokenizer.rs).

Writes tests/fixtures/clip/tokenizer.json (under 200 KB). Run from the repository root:

    pip install -r tests/reference/requirements-clip.txt
    python3 tests/reference/make_clip_tokenizer_fixtures.py

Pinned versions (tests/reference/requirements-clip.txt): python 3.11.7, open_clip_torch
3.3.0, ftfy 6.3.1, regex 2026.11.15, torch 2.11.0 (CPU; only for the id tensors).

What the fixtures pin down, and where the reference behaviour comes from:

- OpenCLIP: `open_clip.tokenizer.SimpleTokenizer` with its packaged
  `bpe_simple_vocab_16e6.txt.gz`: `encode` (no special tokens, no truncation),
  `open_clip.tokenize` (rows of 77, the last id forced to `<end_of_text>` when cut) and
  `decode`.
- SynthCLIP: its `Training/tokenizer.py` is SLIP's copy of OpenAI CLIP's tokenizer; it is
  not a pip package, so this script rebuilds it from OpenCLIP's tokenizer with SLIP's
  three differences, as read in that file: (1) the special tokens are spelled
  `<|startoftext|>` / `<|endoftext|>` (same ids 49406 / 49407, also in the word pattern);
  (2) `whitespace_clean` is `regex.sub(r"\\s+", " ", text).strip()` instead of
  `" ".join(text.split())`; (3) `__call__(texts, context_length=77)` keeps
  `tokens[:77]` of `[sot] + encode(text) + [eot]` and does NOT put the end token back, so
  captions of 76+ word pieces have no end token.
- Pooling: both text towers take `text.argmax(dim=-1)` (SynthCLIP `Training/models.py`
  `CLIP.encode_text`, OpenCLIP `text_global_pool(..., 'argmax')`); recorded per row with
  torch.
- Exhaustive tables, checked code point by code point: which class of CLIP's word pattern
  (compiled with `regex.IGNORECASE` as the reference does) each code point falls in, and
  what `str.lower` does to each code point, with the code points Python's `unicodedata`
  leaves unassigned (those may differ between Unicode versions).
"""

import gzip
import hashlib
import json
import os
import platform
import random
import sys
import unicodedata

import ftfy
import regex
import torch

import open_clip
from open_clip import tokenizer as oc_tok

OUT = os.path.join("tests", "fixtures", "clip", "tokenizer.json")
CONTEXT = 77
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

# A caption longer than 77 tokens.
LONG = (
    "A highly detailed photograph of an old wooden fishing boat resting on a pebble beach at "
    "golden hour, with seagulls circling overhead, nets piled on the deck, peeling blue and "
    "white paint, rope coiled near the bow, distant cliffs covered in heather, soft clouds "
    "reflecting orange light on the calm water, and two children in yellow raincoats "
    "collecting shells near the tide pools while their dog runs along the shoreline."
)

CASES = [
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "MiXeD CaSe WoRdS and camelCaseIdentifiers",
    "",
    "   \t\n  ",
    "\u00a0\u2003\u3000",
    "Héllo wörld — café déjà vu, naïve façade, Ærøskøbing",
    "mañana Ñandú",
    "e\u0301 n\u0303o combining marks: a\u0308\u0304 q\u0323\u0307",
    "ΟΔΟΣ ΟΔΟΣ. Σίσυφος ΣΑΣ σ",
    "İstanbul KELVIN\u212a ẞtraße ǅungla ﬀ",
    "it'ſ ſtrange, '\u017fS",
    "I 👍 emoji 😂😂 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵 and waving 👋🏽 ❤️ 1️⃣",
    "東京タワーの夜景, 北京烤鸭, 서울 야경, ｶﾀｶﾅ",
    "مرحبا بالعالم ١٢٣ ۴۵۶",
    "עִבְרִית with niqqud",
    "हिन्दी देवनागरी and ภาษาไทย",
    "3.14159 and 1,000,000 and 2nd place, 1st, 10x, 0.5mm, ½ ² x² H₂O Ⅻ ⅻ ①",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &amp;amp;lt; &quot;x&quot; a&nbsp;b &eacute;",
    "<b>tags stay</b> &amp; here",
    "don't stop, IT'S fine, we're, they've, I'm, you'll, he'd, y'all, rock'n'roll, 'tis",
    "DON'T WE'LL THEY'D",
    "!!! ??? ... --- *** @@@ #hashtag $100 %50 ^_^ (parens) [brackets] {braces} ~tilde~ |pipe|",
    "!? a!?b !!? wow! ! !! !; !~",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em space\u3000ideographic\u2028line sep",
    "<start_of_text> hello <end_of_text>",
    "<|startoftext|>hi<|endoftext|>",
    "<START_OF_TEXT>x<END_OF_TEXT> <|ENDOFTEXT|>",
    "<ſtart_of_text> <|ſtartoftext|>",
    "<start_of_text><start_of_text>",
    "‘curly quotes’ “double” – en dash … ellipsis",
    "ﬁne ﬂour, ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "\x1b[31mred\x1b[0m text",
    "control\x00chars\x07here\x1cand\x1fthere",
    "a\u0345b \u0345 α\u0345 Α\u0345",
    "zero\u200dwidth\u200cjoiner soft\u00adhyphen bom\ufeffhere",
    "https://example.com/path?q=1&x=2#frag and email@example.com",
    "C++ & C# .NET, node.js, snake_case_name, kebab-case-name",
    "\u1100\u1161\u11a8 decomposed hangul",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "photo of a dog\n",
    LONG,
    LONG + " " + LONG,
    "cat " * 74,
    "cat " * 75,
    "cat " * 76,
    "cat " * 77,
    "cat " * 100,
    "cat " * 75 + "supercalifragilisticexpialidocious",
    "cat " * 75 + "!;",
    "cat " * 75 + "<end_of_text>",
    "cat " * 75 + "<|endoftext|>",
]


def slip_tokenizer():
    """OpenCLIP's tokenizer turned into SLIP's (module doc): same merges and vocabulary,
    SLIP's special-token strings and white-space cleaning."""
    tok = oc_tok.SimpleTokenizer()
    old = ["<start_of_text>", "<end_of_text>"]
    new = ["<|startoftext|>", "<|endoftext|>"]
    for o, n in zip(old, new):
        i = tok.encoder.pop(o)
        tok.encoder[n] = i
        tok.decoder[i] = n
        del tok.cache[o]
        tok.cache[n] = n
    tok.pat = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    tok.clean_fn = lambda text: regex.sub(r"\s+", " ", oc_tok.basic_clean(text)).strip().lower()
    return tok


def slip_rows(tok, texts, context_length=CONTEXT):
    """SLIP's `__call__`: cut to the context length, no end token put back."""
    sot, eot = tok.encoder["<|startoftext|>"], tok.encoder["<|endoftext|>"]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = ([sot] + tok.encode(t) + [eot])[:context_length]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def word_classes():
    """Run-length table of the class each code point falls in alone: 'L' letter run,
    'N' digit, 'P' other run, '-' no match (white space, and what IGNORECASE drops).
    Surrogates are '-' (no Rust char)."""
    flags = regex.IGNORECASE
    classes = [
        ("L", regex.compile(r"[\p{L}]+", flags)),
        ("N", regex.compile(r"[\p{N}]", flags)),
        ("P", regex.compile(r"[^\s\p{L}\p{N}]+", flags)),
    ]
    runs, prev = [], None
    for cp in range(0x110000):
        kind = "-"
        if not 0xD800 <= cp < 0xE000:
            ch = chr(cp)
            hits = [k for k, p in classes if p.fullmatch(ch)]
            assert len(hits) <= 1, (hex(cp), hits)
            kind = hits[0] if hits else "-"
        if kind != prev:
            runs.append([cp, kind])
            prev = kind
    return runs


def lower_table():
    """Every code point whose `str.lower()` is not itself, and the unassigned ranges."""
    changes, unassigned, start = [], [], None
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        ch = chr(cp)
        if ch.lower() != ch:
            changes.append([cp, ch.lower()])
        cn = unicodedata.category(ch) == "Cn"
        if cn and start is None:
            start = cp
        if not cn and start is not None:
            unassigned.append([start, cp - 1])
            start = None
    if start is not None:
        unassigned.append([start, 0x10FFFF])
    return changes, unassigned


def main():
    bpe = oc_tok.default_bpe()
    with open(bpe, "rb") as f:
        raw = f.read()
    assert hashlib.sha256(raw).hexdigest() == BPE_SHA256, "unexpected merges file"
    lines = gzip.decompress(raw).decode("utf-8").split("\n")

    oc = oc_tok.SimpleTokenizer()
    slip = slip_tokenizer()
    assert oc.vocab_size == 49408 and oc.sot_token_id == 49406 and oc.eot_token_id == 49407

    oc_rows = open_clip.tokenize(CASES, context_length=CONTEXT)
    sl_rows = slip_rows(slip, CASES)
    oc_pool = oc_rows.argmax(dim=-1).tolist()
    sl_pool = sl_rows.argmax(dim=-1).tolist()

    cases = []
    for i, text in enumerate(CASES):
        enc = oc.encode(text)
        enc_slip = slip.encode(text)
        case = {
            "text": text,
            "encode": enc,
            "open_clip": oc_rows[i].tolist(),
            "open_clip_pool": oc_pool[i],
            "slip": sl_rows[i].tolist(),
            "slip_pool": sl_pool[i],
            "decode": oc.decode(enc),
        }
        if enc_slip != enc:
            case["encode_slip"] = enc_slip
            case["decode_slip"] = slip.decode(enc_slip)
        cases.append(case)

    # Decoding arbitrary id sequences: specials, bytes cut mid-character, random ids.
    rng = random.Random(0)
    byte_ids = {b: i for i, b in enumerate(oc_tok.bytes_to_unicode().keys())}
    sequences = [
        [49406, 320, 1125, 539, 320, 2368, 49407],
        [byte_ids[b] for b in "😂".encode()[:3]],
        [byte_ids[b] for b in b"\xed\xa0\x80\xc3"] + [256 + byte_ids[0x28]],
        [byte_ids[b] for b in b"</w>"],
        [0, 0, 256, 511, 512, 49405],
    ] + [[rng.randrange(49408) for _ in range(12)] for _ in range(12)]
    decodes = [
        {"ids": ids, "open_clip": oc.decode(ids), "slip": slip.decode(ids)} for ids in sequences
    ]

    changes, unassigned = lower_table()
    fixture = {
        "generator": "tests/reference/make_clip_tokenizer_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "unicodedata": unicodedata.unidata_version,
            "open_clip_torch": open_clip.__version__,
            "ftfy": ftfy.__version__,
            "regex": regex.__version__,
            "torch": torch.__version__,
        },
        "bpe_sha256": BPE_SHA256,
        "merges_file": {
            "lines": len(lines),
            "header": lines[0],
            "first_merge": lines[1],
            "last_merge": lines[49152 - 256 - 2],
        },
        "context_length": CONTEXT,
        "vocab_size": oc.vocab_size,
        "start_id": oc.sot_token_id,
        "end_id": oc.eot_token_id,
        "cases": cases,
        "decodes": decodes,
        "word_classes": word_classes(),
        "lower_changes": changes,
        "unassigned": unassigned,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes, {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()

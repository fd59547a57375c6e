"""Build dcvla's offline tokenizer for the random-weight presets: dcvla/assets/tokenizer.json.

The published checkpoints use the Llama-2 SentencePiece tokenizer, which cannot be downloaded here. The
small presets need a tokenizer that works offline and behaves like Llama's where it matters: `<unk>`,
`<s>`, `</s>` at ids 0, 1, 2, a BOS prepended, words marked with the SentencePiece space "▁", the bare "▁"
piece present (OpenVLA appends it to every prompt), and byte fallback so any text encodes. It is a BPE
trained on the OpenVLA prompt template and LIBERO-style instructions. Deterministic: rerunning gives the
same file.

    python scripts/make_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parents[1] / "dcvla" / "assets" / "tokenizer.json"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]

OBJECTS = """alphabet soup, cream cheese, tomato sauce, ketchup, orange juice, milk, butter, bbq sauce, salad dressing,
chocolate pudding, black bowl, white bowl, plate, basket, cookie box, ramekin, wooden cabinet, flat stove,
wine bottle, wine rack, frying pan, moka pot, mug, yellow and white mug, red mug, porcelain mug, book, caddy,
microwave, drawer, top drawer, middle drawer, bottom drawer, cabinet, stove, tray, box, can, cup, spoon,
akita black bowl, table center, shelf, sink, faucet, pot, bowl, block, cube, towel, corn, carrot, eggplant""".replace("\n", " ")
VERBS = "pick up, put, place, push, open, close, turn on, turn off, stack, move, grab, lift, slide, pour, insert"
PLACES = "on the plate, in the basket, on top of the cabinet, in the top drawer, on the stove, next to the ramekin, " \
    "between the plate and the ramekin, on the cookie box, in the tray, on the wooden shelf, in the microwave"


def corpus() -> list[str]:
    objects = [o.strip() for o in OBJECTS.split(",")]
    verbs = [v.strip() for v in VERBS.split(",")]
    places = [p.strip() for p in PLACES.split(",")]
    lines = []
    for i, obj in enumerate(objects):
        for j, verb in enumerate(verbs):
            place = places[(i + j) % len(places)]
            lines.append(f"In: What action should the robot take to {verb} the {obj} {place}?\nOut:")
    lines += [f"the {a} and the {b}" for a, b in zip(objects, objects[1:])]
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Split at spaces like SentencePiece (merges never cross a word boundary); "▁" marks a word start.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([  # Llama-2's own decoder
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=SPECIALS + BYTES, initial_alphabet=["▁"], show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def main() -> None:
    spec = json.loads(build().to_str())
    # Byte tokens are ordinary vocabulary entries (as in Llama), not special added tokens.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(spec, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    tok = Tokenizer.from_file(str(OUT))
    ids = tok.encode("In: What action should the robot take to pick up the black bowl?\nOut:").ids
    assert ids[0] == 1 and tok.token_to_id("▁") is not None, "tokenizer lost BOS or the bare '▁' piece"
    print(f"wrote {OUT} (vocab {tok.get_vocab_size()}); example ids: {ids}")


if __name__ == "__main__":
    main()

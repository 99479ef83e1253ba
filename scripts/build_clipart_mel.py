"""Build Clipart-MEL, the demo multimodal entity linking dataset, in MIMIC format.

Source: Debian's ``openclipart-svg`` (titles, descriptions, keywords in each
SVG's RDF metadata) and ``openclipart-png`` (the pictures), public domain
(CC0). Entities are clip-art items; mentions name an item by an *ambiguous*
keyword shared by several items, in a context sentence, with a *different*
picture of it (a real transformation of the PNG). Deterministic for a seed.
NIL mentions (answer "nil") show items left out of the KB: most under a
surface form the KB has never seen, some (up to half: as many as there are)
under one of the KB's ambiguous forms ("Apple Core", left out of the KB, as
"the apple").

    apt-get install openclipart-png openclipart-svg
    python scripts/build_clipart_mel.py assets/clipart_mel
"""
import argparse
import hashlib
import io
import json
import random
import re
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from xml.etree import ElementTree

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

SVG_ROOT = Path("/usr/share/openclipart/svg")
PNG_ROOT = Path("/usr/share/openclipart/png")
NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
    "cc2": "http://creativecommons.org/ns#",
}
# Folders of generated icon sets and abstract shapes, whose metadata says little.
SKIP_FOLDERS = {"computer", "shapes", "buttons", "logos", "special", "unsorted"}
GENERIC_KEYWORDS = {
    "clip art", "clipart", "image", "media", "public domain", "svg", "png", "unsorted", "hash",
    "icon", "icons", "theme", "action", "computer", "sign", "signs", "symbol", "signs_and_symbols",
    "people", "food", "animal", "animals", "transport", "transportation", "recreation", "office",
    "geography", "plants", "plant", "tools", "tool", "buildings", "building", "education",
    "electronics", "decorations", "science", "containers", "special", "shape", "shapes", "mapsym",
    "united_nations_member", "europe", "africa", "asia", "america", "oceania", "festive", "cartoon",
    "outline", "color", "colour", "black", "white", "line", "drawing", "art", "misc", "object",
}
JUNK_TITLE = re.compile(r"^(part of the flat icon|clipart by|open clip art|untitled|layer|drawing|svg)", re.I)
STOPWORDS = {"the", "a", "an", "of", "and", "with", "in", "on", "for", "to", "by", "at", "from", "or"}
TEMPLATES = [
    "I found a picture of the {sf} in an old book.",
    "The {sf} on the poster caught everyone's eye.",
    "She pinned the {sf} to the classroom wall.",
    "We printed the {sf} for the school newsletter.",
    "The {sf} appeared on the front of the leaflet.",
    "Someone drew the {sf} on the whiteboard this morning.",
    "He used the {sf} as the logo of his website.",
    "The {sf} was printed on a mug at the market.",
    "Our team chose the {sf} for the banner.",
    "The children coloured in the {sf} during the lesson.",
    "A sticker of the {sf} was stuck on the laptop.",
    "The {sf} decorated the invitation card.",
]
HINTS = [
    "{sentence} It was the {hint} one.",
    "{sentence} Everyone called it the {hint} picture.",
    "{sentence} You know, the {hint} design.",
]


def clean(text: str) -> str:
    text = text.replace("_", " ").replace("-", " ")
    text = re.sub(r"\s+\d+$", "", text.strip())
    return re.sub(r"\s+", " ", text).strip()


def read_metadata(svg: Path):
    try:
        root = ElementTree.parse(svg).getroot()
    except ElementTree.ParseError:
        return None
    work = root.find(".//cc:Work", NS) or root.find(".//cc2:Work", NS)
    if work is None:
        return None
    title = clean(work.findtext("dc:title", default="", namespaces=NS))
    description = (work.findtext("dc:description", default="", namespaces=NS) or "").strip()
    keywords = [li.text.strip().lower() for li in work.findall("dc:subject//rdf:li", NS) if li.text and li.text.strip()]
    if "HASH(" in description or "converted from" in description.lower() or len(description) < 6:
        description = ""
    return title, description, keywords


def collect_items():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # large files are skipped below
    items, seen_pixels, seen_titles = [], set(), set()
    for svg in sorted(SVG_ROOT.rglob("*.svg")):
        relative = svg.relative_to(SVG_ROOT)
        folder = relative.parts[0]
        png = PNG_ROOT / relative.with_suffix(".png")
        if folder in SKIP_FOLDERS or not png.is_file():
            continue
        meta = read_metadata(svg)
        if meta is None:
            continue
        title, description, keywords = meta
        if len(title) < 3 or JUNK_TITLE.match(title) or not re.search(r"[a-zA-Z]{3}", title):
            continue
        try:
            with Image.open(png) as probe:
                too_big = probe.width * probe.height > 16_000_000
        except (OSError, Image.DecompressionBombError):
            continue  # unreadable or a decompression bomb: not demo material
        if too_big:
            continue
        digest = hashlib.sha1(png.read_bytes()).hexdigest()
        if digest in seen_pixels or title.lower() in seen_titles:
            continue  # the same picture filed twice, or a title that is not unique
        seen_pixels.add(digest)
        seen_titles.add(title.lower())
        keywords = [clean(k) for k in keywords]
        keywords = [k for k in dict.fromkeys(keywords) if k and k not in GENERIC_KEYWORDS and len(k) > 2]
        items.append({"png": png, "folder": folder, "title": title, "description": description, "keywords": keywords})
    return items


def surface_forms(items, min_group: int, max_group: int):
    """Each item's ambiguous surface form: the one-word keyword shared by the
    most items, within [min_group, max_group]."""
    words = defaultdict(set)
    for index, item in enumerate(items):
        for keyword in item["keywords"]:
            words[keyword].add(index)
    chosen = {}
    for index, item in enumerate(items):
        options = []
        for word, members in words.items():
            if index in members and min_group <= len(members) <= max_group and " " not in word:
                options.append((len(members), word))
        if options:
            chosen[index] = max(options)[1]
    return chosen


def hint_for(item, surface: str, rng: random.Random):
    words = [w for w in re.findall(r"[A-Za-z]{3,}", item["title"]) if w.lower() not in STOPWORDS]
    words = [w for w in words if w.lower() != surface and surface not in w.lower()]
    if not words:
        words = [k for k in item["keywords"] if k != surface and " " not in k]
    return rng.choice(words).lower() if words else None


def transform(image: Image.Image, rng: random.Random, *, strong: bool) -> Image.Image:
    """A different picture of the same item: background, crop, scale, rotation,
    colour or greyscale change, blur, JPEG compression."""
    rgba = image.convert("RGBA")
    background = tuple(rng.randrange(120, 256) for _ in range(3)) + (255,)
    canvas = Image.new("RGBA", rgba.size, background)
    picture = Image.alpha_composite(canvas, rgba).convert("RGB")
    width, height = picture.size
    keep = rng.uniform(0.55, 0.75) if strong else rng.uniform(0.8, 0.97)
    crop_w, crop_h = int(width * keep), int(height * keep)
    left, top = rng.randrange(0, width - crop_w + 1), rng.randrange(0, height - crop_h + 1)
    picture = picture.crop((left, top, left + crop_w, top + crop_h))
    angle = rng.uniform(-30, 30) if strong else rng.uniform(-10, 10)
    picture = picture.rotate(angle, resample=Image.BICUBIC, expand=True, fillcolor=background[:3])
    if strong:
        picture = ImageOps.grayscale(picture).convert("RGB")
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    else:
        picture = ImageEnhance.Color(picture).enhance(rng.uniform(0.6, 1.4))
        picture = ImageEnhance.Brightness(picture).enhance(rng.uniform(0.8, 1.2))
    side = rng.randrange(150, 200)
    picture.thumbnail((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=rng.randrange(35, 80))
    return Image.open(io.BytesIO(buffer.getvalue()))


def mention_sentence(item, surface: str, rng: random.Random, hint_prob: float) -> str:
    """A template sentence naming ``surface``, with the item's hint word at ``hint_prob``."""
    sentence = rng.choice(TEMPLATES).format(sf=surface)
    hint = hint_for(item, surface, rng) if rng.random() < hint_prob else None
    return rng.choice(HINTS).format(sentence=sentence, hint=hint) if hint else sentence


def mention_sample(out: Path, item, surface: str, mention_id: str, answer: str, rng: random.Random, *,
                   hint_prob: float, strong_prob: float) -> dict:
    """One MIMIC sample: its sentence, and a transformed picture of the item
    written to ``out/mention_image``."""
    sentence = mention_sentence(item, surface, rng, hint_prob)
    transform(Image.open(item["png"]), rng, strong=rng.random() < strong_prob).save(
        out / "mention_image" / f"{mention_id}.jpg", quality=95
    )
    return {"id": mention_id, "sentence": sentence, "mentions": surface, "entities": item["title"],
            "answer": answer, "imgPath": f"{mention_id}.jpg"}


def build(
    out: Path,
    *,
    seed: int,
    n_entities: int,
    mentions_per_entity: int,
    min_group: int,
    max_group: int,
    hint_prob: float,
    strong_prob: float,
    nil_share: float = 0.1,
) -> dict:
    rng = random.Random(seed)
    items = collect_items()
    forms = surface_forms(items, min_group, max_group)
    linkable = sorted(forms)
    rng.shuffle(linkable)
    by_form = defaultdict(list)
    for index in linkable:
        by_form[forms[index]].append(index)
    # Keep whole ambiguity groups so every mention has its confusable entities in the KB.
    selected = []
    for form in sorted(by_form, key=lambda f: (-len(by_form[f]), f)):
        if len(selected) + len(by_form[form]) > n_entities:
            continue
        selected.extend(by_form[form])
    selected.sort(key=lambda i: str(items[i]["png"]))
    (out / "kb_image").mkdir(parents=True, exist_ok=True)
    (out / "mention_image").mkdir(parents=True, exist_ok=True)
    entities, qid2id, samples = [], {}, []
    for row, index in enumerate(selected):
        item = items[index]
        qid = f"CA{row:05d}"
        qid2id[qid] = row
        picture = Image.open(item["png"]).convert("RGBA")
        picture.thumbnail((192, 192), Image.BICUBIC)
        picture.save(out / "kb_image" / f"{qid}.png", optimize=True)
        parts = [item["description"]] if item["description"] else []
        if item["keywords"]:
            parts.append("Keywords: " + ", ".join(item["keywords"][:8]) + ".")
        parts.append(f"Category: {item['folder'].replace('_', ' ')}.")
        entities.append({"id": qid, "entity_name": item["title"], "desc": " ".join(parts),
                         "image_list": [f"{qid}.png"], "type": "entity"})
        for k in range(mentions_per_entity):
            samples.append(mention_sample(out, item, forms[index], f"{qid}-m{k}", qid, rng,
                                          hint_prob=hint_prob, strong_prob=strong_prob))
    rng.shuffle(samples)
    n = len(samples)
    splits = {"train": samples[: int(0.6 * n)], "dev": samples[int(0.6 * n) : int(0.8 * n)], "test": samples[int(0.8 * n) :]}
    # NIL mentions draw on their own generator, so the linkable part above
    # stays what it is for a seed whatever the NIL share.
    nil_samples = nil_mentions(out, items, forms, set(selected), rng=random.Random(seed + 1),
                               count=round(nil_share * n), hint_prob=hint_prob, strong_prob=strong_prob)
    nil_rng = random.Random(seed + 2)
    nil_rng.shuffle(nil_samples)
    m = len(nil_samples)
    for split, part in (("train", nil_samples[: int(0.6 * m)]), ("dev", nil_samples[int(0.6 * m) : int(0.8 * m)]),
                        ("test", nil_samples[int(0.8 * m) :])):
        splits[split] = splits[split] + part
        nil_rng.shuffle(splits[split])
    for split, rows in splits.items():
        (out / f"clipart_{split}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    (out / "kb_entity.json").write_text(json.dumps(entities, indent=1, ensure_ascii=False) + "\n")
    (out / "qid2id.json").write_text(json.dumps(qid2id) + "\n")
    groups = Counter(forms[i] for i in selected)
    print("surface forms:", dict(groups.most_common()), file=sys.stderr)
    stats = {
        "seed": seed,
        "hint_prob": hint_prob,
        "strong_transform_prob": strong_prob,
        "source_items_usable": len(items),
        "entities": len(entities),
        "surface_forms": len(groups),
        "mean_entities_per_surface_form": round(len(selected) / max(len(groups), 1), 2),
        "mentions": {split: len(rows) for split, rows in splits.items()},
        "nil_mentions": {split: sum(1 for r in rows if r["answer"] == "nil") for split, rows in splits.items()},
        "nil_mentions_with_a_kb_surface_form": sum(1 for s in nil_samples if s["mentions"] in set(groups)),
        "mentions_with_text_hint": sum(1 for s in samples if len(s["sentence"].split(". ")) > 1),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def nil_mentions(out: Path, items, forms, selected, *, rng: random.Random, count: int, hint_prob: float,
                 strong_prob: float):
    """``count`` mentions of items left out of the KB, one each: up to half
    named by one of the KB's forms (an unselected item with that keyword or
    title word), the rest by a surface form the KB does not have."""
    kb_forms = {forms[i] for i in selected}
    unseen = sorted(i for i in forms if i not in selected and forms[i] not in kb_forms)
    def kb_words(item):
        words = set(item["keywords"]) | {w.lower() for w in re.findall(r"[A-Za-z]+", item["title"])}
        return sorted(words & kb_forms)

    known = sorted(i for i in range(len(items)) if i not in selected and kb_words(items[i]))
    unseen = [i for i in unseen if i not in set(known)]
    rng.shuffle(unseen)
    rng.shuffle(known)
    half = min(count // 2, len(known))
    chosen = [(i, rng.choice(kb_words(items[i]))) for i in known[:half]]
    chosen += [(i, forms[i]) for i in unseen[: count - half]]
    if len(chosen) < count:
        raise SystemExit(f"only {len(chosen)} items can make NIL mentions, {count} wanted: lower --nil-share")
    samples = []
    for n, (index, surface) in enumerate(chosen):
        samples.append(mention_sample(out, items[index], surface, f"NIL{n:04d}-m0", "nil", rng,
                                      hint_prob=hint_prob, strong_prob=strong_prob))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--entities", type=int, default=300)
    parser.add_argument("--mentions-per-entity", type=int, default=4)
    parser.add_argument("--min-group", type=int, default=3)
    parser.add_argument("--max-group", type=int, default=12)
    parser.add_argument("--hint-prob", type=float, default=0.6,
                        help="share of mentions whose sentence adds a distinctive word of the entity")
    parser.add_argument("--strong-prob", type=float, default=0.6,
                        help="share of mention pictures that are greyscaled, blurred and heavily cropped")
    parser.add_argument("--nil-share", type=float, default=0.1,
                        help="NIL mentions (items left out of the KB), as a share of the linkable mentions")
    args = parser.parse_args()
    if not SVG_ROOT.is_dir() or not PNG_ROOT.is_dir():
        sys.exit(
            "openclipart is not installed: run `apt-get install openclipart-png openclipart-svg` "
            "(Debian), or use the prebuilt copy in assets/clipart_mel."
        )
    stats = build(args.output, seed=args.seed, n_entities=args.entities,
                  mentions_per_entity=args.mentions_per_entity, min_group=args.min_group, max_group=args.max_group,
                  hint_prob=args.hint_prob, strong_prob=args.strong_prob, nil_share=args.nil_share)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()

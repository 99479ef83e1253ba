"""Build Skewed-Clipart-MEL: the demo's KB with mentions whose answers follow a
skewed popularity per surface form, as in real text (most "apple" mentions
mean the same apple). MIMIC format, deterministic for a seed.

Built from the bundled Clipart-MEL alone (no Debian packages): the same 300
entities, images and ambiguous surface forms; each surface form's entities
get a random popularity order and mentions are drawn with Zipf weights
1/rank**exponent. Sentences, hints and mention pictures are made as in
``build_clipart_mel.py`` (pictures from the KB image of the entity); as in
running text, only some mentions come with a picture (``--image-prob``).

    python scripts/build_skewed_mel.py assets/clipart_mel /tmp/skewed_mel --seed 1
"""
import argparse
import json
import random
import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_clipart_mel import mention_sentence, transform  # noqa: E402

SPLITS = ("train", "dev", "test")


def _keywords(description: str):
    found = re.search(r"Keywords: (.*?)\.(?: |$)", description)
    return [k.strip() for k in found.group(1).split(",")] if found else []


def surface_groups(source: Path):
    """Each linkable entity's surface form, read from the demo's mentions."""
    forms = {}
    for split in SPLITS:
        for sample in json.loads((source / f"clipart_{split}.json").read_text()):
            if sample["answer"] != "nil":
                forms[sample["answer"]] = sample["mentions"]
    groups = defaultdict(list)
    for qid, form in sorted(forms.items()):
        groups[form].append(qid)
    return groups


def build(source: Path, out: Path, *, seed: int, exponent: float, mentions_per_entity: int, hint_prob: float,
          strong_prob: float, image_prob: float) -> dict:
    rng = random.Random(seed)
    entities = {e["id"]: e for e in json.loads((source / "kb_entity.json").read_text())}
    groups = surface_groups(source)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("kb_entity.json", "qid2id.json"):
        shutil.copy(source / name, out / name)
    if (out / "kb_image").exists():
        shutil.rmtree(out / "kb_image")
    shutil.copytree(source / "kb_image", out / "kb_image")
    (out / "mention_image").mkdir(exist_ok=True)
    samples = []
    for form in sorted(groups):
        members = list(groups[form])
        rng.shuffle(members)  # popularity order
        weights = [1.0 / (rank + 1) ** exponent for rank in range(len(members))]
        for k in range(mentions_per_entity * len(members)):
            qid = rng.choices(members, weights)[0]
            entity = entities[qid]
            item = {"title": entity["entity_name"], "keywords": _keywords(entity["desc"])}
            sentence = mention_sentence(item, form, rng, hint_prob)
            mention_id = f"{form}-{k:03d}"
            image = ""
            if rng.random() < image_prob:
                image = f"{mention_id}.jpg"
                with Image.open(source / "kb_image" / entity["image_list"][0]) as picture:
                    transform(picture, rng, strong=rng.random() < strong_prob).save(
                        out / "mention_image" / image, quality=95)
            samples.append({"id": mention_id, "sentence": sentence, "mentions": form,
                            "entities": entity["entity_name"], "answer": qid, "imgPath": image})
    rng.shuffle(samples)
    n = len(samples)
    cuts = {"train": samples[: int(0.6 * n)], "dev": samples[int(0.6 * n) : int(0.8 * n)],
            "test": samples[int(0.8 * n) :]}
    for split, rows in cuts.items():
        (out / f"clipart_{split}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    top_share = []
    for form, members in groups.items():
        counts = Counter(s["answer"] for s in samples if s["mentions"] == form)
        top_share.append(counts.most_common(1)[0][1] / sum(counts.values()))
    stats = {
        "source": str(source), "seed": seed, "zipf_exponent": exponent, "hint_prob": hint_prob,
        "strong_transform_prob": strong_prob, "image_prob": image_prob, "entities": len(entities), "surface_forms": len(groups),
        "mentions": {split: len(rows) for split, rows in cuts.items()},
        "mean_share_of_most_popular_answer": round(sum(top_share) / len(top_share), 3),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the bundled Clipart-MEL (assets/clipart_mel)")
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--exponent", type=float, default=1.5, help="Zipf exponent of popularity per surface form")
    parser.add_argument("--mentions-per-entity", type=int, default=4)
    parser.add_argument("--hint-prob", type=float, default=0.6)
    parser.add_argument("--strong-prob", type=float, default=0.6)
    parser.add_argument("--image-prob", type=float, default=0.5,
                        help="share of mentions that come with a picture (in text, most do not)")
    args = parser.parse_args()
    if not (args.source / "kb_entity.json").is_file():
        sys.exit(f"{args.source}: no kb_entity.json (pass the bundled assets/clipart_mel)")
    stats = build(args.source, args.output, seed=args.seed, exponent=args.exponent,
                  mentions_per_entity=args.mentions_per_entity, hint_prob=args.hint_prob,
                  strong_prob=args.strong_prob, image_prob=args.image_prob)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()

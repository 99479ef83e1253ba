"""Check that a MIMIC-format dataset is where the project expects it.

    python scripts/check_mimic_dataset.py assets/wikimel WikiMEL
"""
import sys
from pathlib import Path

EXPECTED = ("kb_entity.json, *_train.json, *_dev.json, *_test.json, mention_image/, kb_image/, and "
            "qid2id.json when the answers (QIDs) are not the kb_entity.json ids")


def main() -> int:
    root, name = Path(sys.argv[1]), sys.argv[2]
    problems = []
    if not root.is_dir():
        problems.append(f"the folder {root} does not exist")
    else:
        for required in ("kb_entity.json", "mention_image", "kb_image"):
            if not (root / required).exists():
                problems.append(f"{root / required} is missing")
        for split in ("train", "dev", "test"):
            if len(list(root.glob(f"*_{split}.json"))) != 1:
                problems.append(f"expected exactly one *_{split}.json in {root}")
    if problems:
        print(f"{name} is not ready: " + "; ".join(problems) + ".", file=sys.stderr)
        print(
            f"{name} cannot be downloaded by this project. Get it from the MIMIC release "
            f"(WikiMEL, RichpediaMEL and WikiDiverse share its format) and place it in {root} "
            f"with: {EXPECTED}. See README, 'Bring your own data'.",
            file=sys.stderr,
        )
        return 1
    print(f"{name} found in {root}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

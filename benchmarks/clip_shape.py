"""A random-weight CLIP with ViT-B/32's shapes, written to a folder: the
throughput benchmarks need the paper's backbone shape but no downloaded
weights (time does not depend on the values)."""
import json
from pathlib import Path


def byte_level_vocab() -> dict:
    """A CLIP-style byte-level BPE vocabulary without merges (tokens = characters)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    vocab = {}
    chars = [chr(c) for c in codes]
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab


def save_vit_b32(directory: Path) -> Path:
    """Random-weight CLIP with ViT-B/32's shapes (text 512 x 12 layers, vision
    768 x 12 layers, patch 32, 224 px, projection 512)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = byte_level_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(str(directory))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(),
        projection_dim=512,
    )
    CLIPModel(config).save_pretrained(str(directory))
    return directory

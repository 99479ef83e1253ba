"""A random-weight CLIP saved like a user's local CLIP directory.

For tests and throughput benchmarks: they need the paper's backbone code
path and shapes, not its weights (which cannot be downloaded here). The
tokenizer is byte-level BPE without merges, so tokens are characters.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional


def byte_level_vocab() -> Dict[str, int]:
    """A CLIP-style byte-level vocabulary: every byte's character, with and
    without the end-of-word mark, plus the two special tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab: Dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    return vocab


def save_random_clip(
    directory: Path,
    *,
    text_config: Optional[Dict[str, Any]] = None,
    vision_config: Optional[Dict[str, Any]] = None,
    projection_dim: int = 512,
    seed: Optional[int] = None,
) -> Path:
    """Save a random ``CLIPModel`` and its tokenizer with ``save_pretrained``.
    The defaults are ViT-B/32's shapes (text 512 x 12 layers, vision 768 x 12
    layers, patch 32, 224 px, projection 512)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = byte_level_vocab()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(str(directory))
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), **special, **(text_config or {})},
        vision_config=dict(vision_config or {}),
        projection_dim=projection_dim,
    )
    if seed is not None:
        torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(directory))
    return directory

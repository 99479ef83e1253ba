import pytest
import torch

from spacy_m3el.model import EncodedItems, M3ELConfig

DIMS = dict(text_dim=16, image_global_dim=12, image_token_dim=10, image_dim=8, hidden_dim=8)


def random_items(n, *, text_len=6, patches=5, seed=0, image_mask=None):
    gen = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(n, text_len, dtype=torch.bool)
    for i in range(n):
        text_mask[i, 2 + (i % (text_len - 2)):] = False  # varied lengths, at least 2 tokens
    if image_mask is None:
        image_mask = torch.ones(n, dtype=torch.bool)
    return EncodedItems(
        text_global=torch.randn(n, DIMS["text_dim"], generator=gen),
        text_tokens=torch.randn(n, text_len, DIMS["text_dim"], generator=gen),
        text_mask=text_mask,
        image_global=torch.randn(n, DIMS["image_global_dim"], generator=gen),
        image_tokens=torch.randn(n, patches, DIMS["image_token_dim"], generator=gen),
        image_mask=image_mask,
    )


@pytest.fixture
def config():
    return M3ELConfig(**DIMS)

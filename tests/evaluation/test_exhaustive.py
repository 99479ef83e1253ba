"""The paper's protocol with bounded late interaction: the ranks and tops of
scoring every pair in full, from a fraction of the pairs."""
import pytest
import torch

from spacy_m3el.evaluation import exhaustive
from spacy_m3el.evaluation.exhaustive import exhaustive_ranks, exhaustive_ranks_in_full, gold_mentions
from spacy_m3el.pipeline import linking
from spacy_m3el.pipeline.linker import find_linker

from tests.pipeline.test_linker import examples_for, make_docs, train_pipeline


@pytest.fixture(scope="module")
def linked(picture_dir):
    nlp, _ = train_pipeline(picture_dir, epochs=1)  # one epoch: scores close together, gold entities below the top
    examples = examples_for(nlp, make_docs(nlp, picture_dir))
    spans, ids = gold_mentions(examples)
    ids[1] = "not-in-the-kb"
    return find_linker(nlp), spans, ids


def test_the_bound_holds_for_every_pair(linked):
    linker, spans, _ = linked
    index = linker.exact_entity_index()
    matcher = linker.network.matcher
    with torch.no_grad():
        mention = linker.mentions.encode(spans)
        late = linking.exhaustive_scores(matcher, mention, index) - linking.decomposable_scores(matcher, mention, index)
    bounds = linking.late_interaction_bounds(matcher, index)
    assert late.abs().max() > 0 and (late.abs() <= bounds[None] + 1e-4).all()


def test_bounded_ranks_equal_the_full_protocol_and_score_fewer_pairs(linked, monkeypatch):
    linker, spans, ids = linked
    scored = []
    real = exhaustive._full_scores
    monkeypatch.setattr(exhaustive, "_full_scores",
                        lambda m, mention, index, rows: scored.append(len(rows)) or real(m, mention, index, rows))
    ranks, top = exhaustive_ranks(linker, spans, ids, batch_size=7)
    reference_ranks, reference_top = exhaustive_ranks_in_full(linker, spans, ids)
    assert ranks == reference_ranks and top == reference_top
    assert ranks[1] is None and any(rank > 1 for rank in ranks if rank is not None)
    assert sum(scored) < len(spans) * len(linker.kb)

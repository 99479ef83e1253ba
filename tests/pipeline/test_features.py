import math

import pytest
import spacy
from spacy.training import Example

from spacy_m3el.evaluation.scoring import answer_scores
from spacy_m3el.extensions import register_extensions
from spacy_m3el.kb.base import NIL
from spacy_m3el.model.candidate_scorer import MIN_LOG_PRIOR
from spacy_m3el.pipeline.features import in_batch_features, lexical_features


def test_lexical_features_of_alias_and_dense_candidates():
    alias = lexical_features("Paris", "Paris", 0.8)
    assert alias == {"log_prior": pytest.approx(math.log(0.8)), "from_alias": 1.0, "name_exact": 1.0,
                     "name_normalized": 1.0}
    dense = lexical_features("PARIS", "Paris Hilton", None)
    assert dense == {"log_prior": 0.0, "from_alias": 0.0, "name_exact": 0.0, "name_normalized": 0.0}
    # Case and Unicode width do not matter to the normalised match; a zero prior is floored.
    assert lexical_features("ＰＡＲＩＳ", "paris", 0.0)["name_normalized"] == 1.0
    assert lexical_features("x", "y", 0.0)["log_prior"] == MIN_LOG_PRIOR


def test_in_batch_features_shape_and_values():
    features = in_batch_features(["apple", "pear"], ["Apple", "Pear tree"], [{10: 0.5}, {}], [10, 11])
    assert features.shape == (2, 2, 4)
    assert features[0, 0].tolist() == pytest.approx([math.log(0.5), 1.0, 0.0, 1.0])
    assert features[1].sum() == 0.0


def test_answer_scores_count_nil_and_calibration():
    register_extensions()
    nlp = spacy.blank("en")
    examples = []
    # (gold, predicted, probability of the answer)
    for gold, predicted, prob in [("Q1", "Q1", 0.9), ("Q2", NIL, 0.6), (NIL, NIL, 0.8), (NIL, "Q3", 0.7)]:
        ref = nlp.make_doc("See Zorgl now.")
        ref.ents = [ref.char_span(4, 9, label="X", kb_id=gold)]
        pred = nlp.make_doc("See Zorgl now.")
        pred.ents = [pred.char_span(4, 9, label="X", kb_id=predicted)]
        pred.ents[0]._.m3el_score = prob
        examples.append(Example(pred, ref))
    scores = answer_scores(examples)
    assert scores["m3el_accuracy"] == 0.5 and scores["m3el_n_nil"] == 2
    assert scores["m3el_nil_p"] == 0.5 and scores["m3el_nil_r"] == 0.5 and scores["m3el_nil_f"] == 0.5
    # bins: 0.6 wrong, 0.7 wrong, 0.8 right, 0.9 right -> |0-0.6|+|0-0.7|+|1-0.8|+|1-0.9| over 4
    assert scores["m3el_ece"] == pytest.approx((0.6 + 0.7 + 0.2 + 0.1) / 4)

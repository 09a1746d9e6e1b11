"""The classifier's signals of a request's shape: whether it is put as a question, and how many sentences it has."""

from __future__ import annotations

from gateway.routing.classifier import Classifier
from gateway.routing.signals import DEFAULT_VOCABULARY, question_of, signals, words_of


def _signals(text: str) -> dict[str, float]:
    question = question_of(text)
    return signals(question, words_of(question), 1, False, DEFAULT_VOCABULARY)


def test_a_request_put_as_a_question_is_not_an_instruction():
    assert _signals("What is the capital of France?")["instruction"] == 0.0
    assert _signals("What is the capital of France?  \n")["instruction"] == 0.0
    assert _signals("Write a function that reverses a list.")["instruction"] == 1.0
    assert _signals("The capital of France is")["instruction"] == 1.0
    assert _signals("")["instruction"] == 0.0


def test_answer_options_do_not_decide_the_shape_of_the_question():
    listed = "Which planet is largest?\nA. Mars\nB. Jupiter\nC. Venus\nD. Earth\nAnswer:"
    assert _signals(listed)["instruction"] == 0.0 and _signals(listed)["sentences"] == 0.0


def test_sentences_beyond_the_first_count_up_to_seven():
    assert _signals("Hello there.")["sentences"] == 0.0
    assert _signals("One. Two! Three? Four.")["sentences"] == 0.5
    assert _signals("A sentence. " * 20)["sentences"] == 1.0
    assert _signals("Version 3.11 is out")["sentences"] == 0.0  # a decimal point ends no sentence


def test_every_signal_is_reported_with_the_decision():
    decision = Classifier().classify({"messages": [{"role": "user", "content": "Plan the migration. Then test it."}]})
    assert decision.signals["instruction"] == 1.0 and decision.signals["sentences"] == 1 / 6


def test_without_a_scorer_the_signals_of_shape_leave_the_seed_thresholds_their_meaning():
    """Nearly every request has some shape; without a scorer's own thresholds, shape alone must not make a
    plain request of a few sentences COMPLEX."""
    email = "Can you help me write an email to my landlord? The heating is broken. It has been a week. I want it fixed."
    assert Classifier().classify({"messages": [{"role": "user", "content": email}]}).complexity.value == "simple"


def test_the_explanation_names_what_moved_the_score_not_what_says_nothing():
    """The learned scorer says about its prior of a request whose words it never saw: that is not what decided."""
    from gateway.routing.scorer import LearnedScorer

    scorer = LearnedScorer.load()
    classifier = Classifier(weights=scorer.blend, scorer=scorer)
    decision = classifier.classify({"messages": [{"role": "user", "content": "Plan the migration. Then test it."}]})
    assert abs(decision.signals["learned"] - scorer.prior) < 0.05
    explained = decision.explain(classifier.weights, neutral=classifier.neutral)
    assert explained.split(",")[0] == "instruction=1.00" and "sentences=0.17" in explained


def test_what_the_ledger_keeps_is_the_scorers_own_reading_of_the_words():
    from gateway.routing.scorer import LearnedScorer, features_of

    text = "Plan the migration of the billing database, then test each step."
    body = {"messages": [{"role": "user", "content": text}]}
    scorer = LearnedScorer.load()
    with_scorer = Classifier(weights=scorer.blend, scorer=scorer).classify(body)
    assert with_scorer.hashed is not None  # read once, for the score and for the ledger
    for decision in (with_scorer, Classifier().classify(body)):
        assert sorted(decision.features()) == list(features_of(text))

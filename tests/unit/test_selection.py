"""Trace selection: from journal records to ReST-EM training examples and preference pairs.

Records are built with the journal's own `request_record` / `feedback_record`, shaped like the server's
`trace_record`, so the selection sees exactly what a served request leaves on disk.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from server.trace_journal import TraceJournal, feedback_record, iter_segment_paths, request_record
from training.selection import (
    Example,
    PreferencePair,
    SelectionConfig,
    UnsolvedPrompt,
    candidate_reward,
    load_journal,
    preference_pairs,
    select_examples,
    select_from_journal,
    to_preference_rows,
    to_sft_rows,
)

SIX_SEVENS = "What is 6 * 7?"


# --------------------------------------------------------------------------- builders


def candidate(index: int, text: str, *, finish_reason: str = "stop", **scores: float) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "num_tokens": len(text.split()),
        "finish_reason": finish_reason,
        "cumulative_logprob": -1.5,
        "answer": None,
        "scores": dict(scores),
    }


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]


def request(
    trace_id: str,
    candidates: list[dict[str, Any]],
    *,
    question: str = SIX_SEVENS,
    reference: str | None = None,
    chosen: list[int] | None = None,
    status: str = "ok",
    chat: bool = True,
) -> dict[str, Any]:
    """A request record shaped like `server.serving.trace_record` writes it."""
    chosen = [0] if chosen is None else chosen
    return request_record(
        trace_id=trace_id,
        request_id=f"req-{trace_id}",
        endpoint="chat.completions" if chat else "completions",
        model="ponder-test",
        input={"messages": messages(question)} if chat else {"prompt": question},
        sampling={"temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "n": 1, "stop": [], "seed_ignored": False},
        reference=reference,
        tests=[],
        strategy={"name": "self_consistency", "options": {"n": len(candidates)}, "source": "header"},
        candidates=candidates,
        chosen_index=chosen[0] if chosen else None,
        chosen_indices=chosen,
        details={},
        engine_calls=[],
        usage={"prompt_tokens": 9, "completion_tokens": 30, "returned_tokens": 5, "reasoning_tokens": 25},
        latency_s=0.25,
        status=status,
        error=None if status == "ok" else "boom",
    )


def texts(selection_examples: list[Example]) -> list[str]:
    return [e.completion for e in selection_examples]


# --------------------------------------------------------------------------- candidate_reward

RIGHT, WRONG = "The answer is 42.", "The answer is 41."


def test_auto_prefers_feedback_for_the_chosen_candidate() -> None:
    record = request("tr-a", [candidate(0, RIGHT, answer_agreement=0.5)], reference="42")
    feedback = [feedback_record("tr-a", 0.25)]
    # The reference would say 1.0 and the verifier 0.5: posted feedback beats both.
    assert candidate_reward(record, record["candidates"][0], feedback, SelectionConfig()) == (0.25, "feedback")


def test_auto_feedback_does_not_apply_to_candidates_the_client_never_saw() -> None:
    cands = [candidate(0, WRONG, answer_agreement=0.5), candidate(1, RIGHT, answer_agreement=0.5)]
    record = request("tr-a", cands, reference="42", chosen=[0])
    feedback = [feedback_record("tr-a", 0.0)]
    config = SelectionConfig()
    assert candidate_reward(record, cands[0], feedback, config) == (0.0, "feedback")
    assert candidate_reward(record, cands[1], feedback, config) == (1.0, "reference")


def test_auto_falls_back_to_the_verifier_without_feedback_or_reference() -> None:
    cands = [candidate(0, RIGHT, answer_agreement=0.625), candidate(1, WRONG, logprob=0.9)]
    record = request("tr-a", cands)
    config = SelectionConfig()
    assert candidate_reward(record, cands[0], [], config) == (0.625, "verifier")
    assert candidate_reward(record, cands[1], [], config) is None  # only a score of another verifier


def test_an_empty_reference_is_no_reference() -> None:
    record = request("tr-a", [candidate(0, "", answer_agreement=0.5)], reference="")
    assert candidate_reward(record, record["candidates"][0], [], SelectionConfig()) == (0.5, "verifier")


def test_reference_match_uses_the_final_answer_of_a_gsm8k_reference() -> None:
    cands = [candidate(0, "So 6 * 7 = 42."), candidate(1, WRONG)]
    record = request("tr-a", cands, reference="Six sevens make forty-two.\n#### 42")
    config = SelectionConfig()
    assert candidate_reward(record, cands[0], [], config) == (1.0, "reference")
    assert candidate_reward(record, cands[1], [], config) == (0.0, "reference")


@pytest.mark.parametrize(
    ("source", "index", "expected"),
    [
        ("feedback", 0, (0.25, "feedback")),
        ("feedback", 1, None),  # feedback rates the chosen candidate only
        ("reference", 0, (1.0, "reference")),
        ("reference", 1, (0.0, "reference")),
        ("verifier", 0, (0.5, "verifier")),
        ("verifier", 1, (0.75, "verifier")),
    ],
)
def test_an_explicit_source_ignores_the_others(source: str, index: int, expected: tuple | None) -> None:
    cands = [candidate(0, RIGHT, answer_agreement=0.5), candidate(1, WRONG, answer_agreement=0.75)]
    record = request("tr-a", cands, reference="42", chosen=[0])
    feedback = [feedback_record("tr-a", 0.25)]
    assert candidate_reward(record, cands[index], feedback, SelectionConfig(reward_source=source)) == expected


@pytest.mark.parametrize("source", ["feedback", "reference", "verifier"])
def test_an_explicit_source_with_nothing_to_say_gives_none(source: str) -> None:
    record = request("tr-a", [candidate(0, RIGHT, logprob=0.9)])  # no feedback, no reference, no agreement score
    assert candidate_reward(record, record["candidates"][0], [], SelectionConfig(reward_source=source)) is None


def test_the_verifier_source_reads_the_configured_score() -> None:
    record = request("tr-a", [candidate(0, RIGHT, answer_agreement=0.5, logprob=0.875)])
    config = SelectionConfig(reward_source="verifier", verifier="logprob")
    assert candidate_reward(record, record["candidates"][0], [], config) == (0.875, "verifier")


def test_a_reference_posted_with_feedback_grades_every_candidate() -> None:
    cands = [candidate(0, WRONG), candidate(1, RIGHT), candidate(2, "The answer is 43.")]
    record = request("tr-a", cands, reference=None, chosen=[0])
    feedback = [feedback_record("tr-a", 0.0, reference="42")]
    config = SelectionConfig(reward_source="reference")
    assert [candidate_reward(record, c, feedback, config) for c in cands] == [
        (0.0, "reference"),
        (1.0, "reference"),
        (0.0, "reference"),
    ]
    # Under auto the chosen one keeps its feedback, the others are graded by the posted reference.
    auto = [candidate_reward(record, c, feedback, SelectionConfig()) for c in cands]
    assert auto == [(0.0, "feedback"), (1.0, "reference"), (0.0, "reference")]


def test_a_reference_posted_with_feedback_overrides_the_requests_reference() -> None:
    cands = [candidate(0, WRONG), candidate(1, RIGHT)]
    record = request("tr-a", cands, reference="41", chosen=[0])
    config = SelectionConfig(reward_source="reference")
    assert candidate_reward(record, cands[0], [], config) == (1.0, "reference")  # the request's own reference
    feedback = [feedback_record("tr-a", 1.0, reference="42")]
    assert candidate_reward(record, cands[0], feedback, config) == (0.0, "reference")
    assert candidate_reward(record, cands[1], feedback, config) == (1.0, "reference")


def test_the_latest_feedback_wins() -> None:
    cands = [candidate(0, RIGHT), candidate(1, WRONG)]
    record = request("tr-a", cands, chosen=[0])
    feedback = [feedback_record("tr-a", 1.0, reference="41"), feedback_record("tr-a", 0.0, reference="42")]
    assert candidate_reward(record, cands[0], feedback, SelectionConfig()) == (0.0, "feedback")
    reference_only = SelectionConfig(reward_source="reference")
    assert candidate_reward(record, cands[0], feedback, reference_only) == (1.0, "reference")  # graded by "42"
    assert candidate_reward(record, cands[1], feedback, reference_only) == (0.0, "reference")


def test_a_later_feedback_without_reference_keeps_the_earlier_reference() -> None:
    cands = [candidate(0, WRONG), candidate(1, RIGHT)]
    record = request("tr-a", cands, chosen=[0])
    feedback = [feedback_record("tr-a", 0.0, reference="42"), feedback_record("tr-a", 0.5)]
    assert candidate_reward(record, cands[0], feedback, SelectionConfig()) == (0.5, "feedback")
    assert candidate_reward(record, cands[1], feedback, SelectionConfig()) == (1.0, "reference")


def test_feedback_applies_to_every_returned_candidate_when_n_is_above_one() -> None:
    cands = [candidate(0, RIGHT), candidate(1, RIGHT), candidate(2, RIGHT, answer_agreement=1.0)]
    record = request("tr-a", cands, chosen=[0, 1])
    feedback = [feedback_record("tr-a", 0.5)]
    rewards = [candidate_reward(record, c, feedback, SelectionConfig()) for c in cands]
    assert rewards == [(0.5, "feedback"), (0.5, "feedback"), (1.0, "verifier")]


def test_a_record_without_chosen_indices_uses_chosen_index() -> None:
    cands = [candidate(0, WRONG, answer_agreement=0.5), candidate(1, RIGHT, answer_agreement=0.5)]
    record = request("tr-a", cands)
    del record["chosen_indices"]
    record["chosen_index"] = 1
    feedback = [feedback_record("tr-a", 0.75)]
    assert candidate_reward(record, cands[0], feedback, SelectionConfig()) == (0.5, "verifier")
    assert candidate_reward(record, cands[1], feedback, SelectionConfig()) == (0.75, "feedback")


# --------------------------------------------------------------------------- select_examples


def verified(trace_id: str, scores: list[float], question: str = SIX_SEVENS, **kw: Any) -> dict[str, Any]:
    """A request whose candidate i says "answer i" and has answer_agreement score scores[i]."""
    return request(
        trace_id,
        [candidate(i, f"Answer {i}.", answer_agreement=s) for i, s in enumerate(scores)],
        question=question,
        **kw,
    )


def test_threshold_keeps_rewards_at_or_above_it() -> None:
    selection = select_examples([verified("tr-a", [1.0, 0.75, 0.5, 0.74])], {}, SelectionConfig(threshold=0.75))
    assert [(e.completion, e.reward) for e in selection.examples] == [("Answer 0.", 1.0), ("Answer 1.", 0.75)]
    assert selection.report.rejected == Counter({"reward below threshold": 2})


def test_the_default_threshold_keeps_only_a_full_reward() -> None:
    selection = select_examples([verified("tr-a", [0.99, 1.0])], {}, SelectionConfig())
    assert texts(selection.examples) == ["Answer 1."]


def test_max_per_prompt_keeps_the_highest_rewards() -> None:
    record = verified("tr-a", [0.2, 0.9, 0.5, 1.0, 0.7])
    selection = select_examples([record], {}, SelectionConfig(threshold=0.0, max_per_prompt=2))
    assert [(e.completion, e.reward) for e in selection.examples] == [("Answer 3.", 1.0), ("Answer 1.", 0.9)]
    assert selection.report.rejected == Counter({"over the per-prompt cap": 3})


def test_the_cap_counts_every_request_of_a_prompt_but_not_other_prompts() -> None:
    records = [
        verified("tr-a", [1.0, 1.0]),
        request(
            "tr-b", [candidate(0, "Answer 2.", answer_agreement=1.0), candidate(1, "Answer 3.", answer_agreement=1.0)]
        ),
        verified("tr-c", [1.0, 1.0, 1.0], question="What is 3 * 4?"),
    ]
    selection = select_examples(records, {}, SelectionConfig(max_per_prompt=3))
    by_prompt = Counter(e.prompt[-1]["content"] for e in selection.examples)
    assert by_prompt == {SIX_SEVENS: 3, "What is 3 * 4?": 3}
    assert selection.report.rejected == Counter({"over the per-prompt cap": 1})
    assert selection.report.prompts == 2


def test_completions_that_differ_only_in_whitespace_are_kept_once() -> None:
    cands = [
        candidate(0, "The answer is 42.", answer_agreement=1.0),
        candidate(1, "  The answer   is\n42.\n", answer_agreement=1.0),
        candidate(2, "The answer is 42!", answer_agreement=1.0),  # differs in more than whitespace
    ]
    selection = select_examples([request("tr-a", cands)], {}, SelectionConfig(max_per_prompt=2))
    # The duplicate neither becomes an example nor uses up a place under the cap.
    assert texts(selection.examples) == ["The answer is 42.", "The answer is 42!"]
    assert selection.report.rejected == Counter({"duplicate of a kept completion": 1})


def test_duplicates_are_found_across_requests_and_kept_text_is_stripped() -> None:
    records = [
        request("tr-a", [candidate(0, "\n  The answer is 42.  \n", answer_agreement=1.0)]),
        request("tr-b", [candidate(0, "The answer is\t42.", answer_agreement=1.0)]),
    ]
    selection = select_examples(records, {}, SelectionConfig())
    assert [(e.completion, e.trace_id) for e in selection.examples] == [("The answer is 42.", "tr-a")]
    assert selection.report.rejected == Counter({"duplicate of a kept completion": 1})


def test_unfinished_candidates_are_skipped_unless_asked_for() -> None:
    cands = [
        candidate(0, "The answer is 42.", answer_agreement=1.0),
        candidate(1, "The answer is 42 because six", finish_reason="length", answer_agreement=1.0),
    ]
    record = request("tr-a", cands)
    skipped = select_examples([record], {}, SelectionConfig())
    assert texts(skipped.examples) == ["The answer is 42."]
    assert skipped.report.rejected == Counter({"unfinished (length)": 1})
    assert skipped.report.candidates == 2

    included = select_examples([record], {}, SelectionConfig(include_unfinished=True))
    assert texts(included.examples) == ["The answer is 42.", "The answer is 42 because six"]
    assert included.report.rejected == Counter()


def test_non_chat_records_are_skipped_with_their_reason() -> None:
    record = request("tr-a", [candidate(0, RIGHT, answer_agreement=1.0), candidate(1, RIGHT)], chat=False)
    selection = select_examples([record], {}, SelectionConfig())
    assert selection.examples == [] and selection.pairs == []
    assert selection.report.requests == 1
    assert selection.report.rejected == Counter({"not a chat request": 2})
    assert selection.report.kept == 0 and selection.report.prompts == 0


def mixed_requests() -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    requests = [
        request(
            "tr-1",
            [
                candidate(0, "The answer is 42."),  # reference 1.0: kept
                candidate(1, "The answer is\n  42. "),  # duplicate
                candidate(2, "The answer is 41."),  # reference 0.0: below threshold
                candidate(3, "6 * 7 = 42"),  # kept
                candidate(4, "7 * 6 = 42"),  # over the cap of 2
                candidate(5, "The answer is 4", finish_reason="length"),  # unfinished
            ],
            reference="42",
        ),
        request(
            "tr-2",
            [
                candidate(0, "The answer is 12.", answer_agreement=0.5),  # feedback 1.0: kept
                candidate(1, "The answer is 13.", answer_agreement=0.5),  # verifier 0.5: below threshold
                candidate(2, "The answer is 14.", logprob=0.9),  # no reward
            ],
            question="What is 3 * 4?",
        ),
        request(
            "tr-3",
            [
                candidate(0, "The answer is 4.", answer_agreement=1.0),  # verifier 1.0: kept
                candidate(1, "The answer is 5.", finish_reason="length", answer_agreement=1.0),  # unfinished
            ],
            question="What is 2 * 2?",
        ),
        request("tr-4", [candidate(0, "The answer is 80.")], question="What is 9 * 9?", reference="81"),  # below
    ]
    return requests, {"tr-2": [feedback_record("tr-2", 1.0)], "tr-unknown": [feedback_record("tr-unknown", 1.0)]}


def test_the_report_counts_every_candidate_exactly_once() -> None:
    requests, feedback = mixed_requests()
    selection = select_examples(requests, feedback, SelectionConfig(max_per_prompt=2))
    report = selection.report
    assert report.as_dict() == {
        "requests": 4,
        "feedback_records": 0,  # filled in by select_from_journal
        "candidates": 12,
        "skipped_lines": 0,
        "prompts": 4,
        "prompts_with_an_example": 3,
        "kept": 4,
        "pairs": 3,  # 42 and 6 * 7 = 42 each against 41 (the one reject is cycled); 12 against 13
        "prompts_with_a_pair": 2,
        "rejected": {
            "duplicate of a kept completion": 1,
            "reward below threshold": 3,
            "over the per-prompt cap": 1,
            "unfinished (length)": 2,
            "no reward from the chosen source": 1,
        },
        "reward_sources": {"reference": 2, "feedback": 1, "verifier": 1},
    }
    assert report.kept + sum(report.rejected.values()) == report.candidates
    assert sum(report.reward_sources.values()) == report.kept == len(selection.examples)
    assert sorted((e.completion, e.reward, e.reward_source, e.trace_id) for e in selection.examples) == [
        ("6 * 7 = 42", 1.0, "reference", "tr-1"),
        ("The answer is 12.", 1.0, "feedback", "tr-2"),
        ("The answer is 4.", 1.0, "verifier", "tr-3"),
        ("The answer is 42.", 1.0, "reference", "tr-1"),
    ]
    assert report.pairs == len(selection.pairs)
    # Only 9 * 9 has a reference and no kept candidate; 2 * 2 has none, 3 * 4 is solved by feedback.
    assert selection.unsolved == [UnsolvedPrompt(tuple(messages("What is 9 * 9?")), "81", "tr-4")]
    json.dumps(report.as_dict())  # written into ponder-distill.json


def test_the_report_adds_up_with_non_chat_records() -> None:
    requests, feedback = mixed_requests()
    requests.append(request("tr-5", [candidate(0, RIGHT, answer_agreement=1.0), candidate(1, WRONG)], chat=False))
    report = select_examples(requests, feedback, SelectionConfig(max_per_prompt=2)).report
    assert report.rejected["not a chat request"] == 2
    assert report.kept + sum(report.rejected.values()) == report.candidates


def test_prompts_counts_every_chat_prompt_seen() -> None:
    requests = [
        verified("tr-a", [1.0]),
        request("tr-b", [candidate(0, "The answer is", finish_reason="length", answer_agreement=1.0)], question="Q2"),
        request("tr-c", [candidate(0, RIGHT, logprob=0.5)], question="Q3"),  # no reward from the chosen source
    ]
    report = select_examples(requests, {}, SelectionConfig()).report
    assert (report.prompts, report.prompts_with_an_example) == (3, 1)


def test_preference_pairs_stay_within_one_prompt() -> None:
    requests = [
        verified("tr-a", [1.0, 1.0], question="only good"),
        verified("tr-b", [0.0, 0.5], question="only bad"),
        request(
            "tr-c",
            [
                candidate(0, "good 1", answer_agreement=1.0),
                candidate(1, "bad 1", answer_agreement=0.25),
                candidate(2, "good 2", answer_agreement=1.0),
                candidate(3, "bad 2", answer_agreement=0.5),
                candidate(4, "bad 3", answer_agreement=0.0),
            ],
            question="mixed",
        ),
    ]
    selection = select_examples(requests, {}, SelectionConfig())
    assert texts(selection.examples) == ["Answer 0.", "Answer 1.", "good 1", "good 2"]
    # Only "mixed" has both kept and rejected candidates; the highest-reward rejects are used first, and the
    # shorter list (the kept ones) is cycled so that every distinct reject is used.
    assert selection.pairs == [
        PreferencePair(tuple(messages("mixed")), "good 1", "bad 2", "tr-c"),
        PreferencePair(tuple(messages("mixed")), "good 2", "bad 1", "tr-c"),
        PreferencePair(tuple(messages("mixed")), "good 1", "bad 3", "tr-c"),
    ]


def test_pairs_never_mix_two_prompts_even_across_requests() -> None:
    requests = [
        verified("tr-a", [1.0], question="A"),
        request("tr-b", [candidate(0, "Wrong for B.", answer_agreement=0.0)], question="B"),
        request("tr-c", [candidate(0, "Wrong for A.", answer_agreement=0.0)], question="A"),
        verified("tr-d", [1.0], question="B"),
    ]
    selection = select_examples(requests, {}, SelectionConfig())
    by_trace = {r["trace_id"]: r for r in requests}
    assert len(selection.pairs) == 2
    for pair in selection.pairs:
        rejected_of_prompt = {
            c["text"]
            for r in requests
            if r["input"]["messages"] == list(pair.prompt)
            for c in r["candidates"]
            if c["scores"]["answer_agreement"] < 1.0
        }
        assert pair.rejected in rejected_of_prompt
        assert list(pair.prompt) == by_trace[pair.trace_id]["input"]["messages"]


def test_a_pair_never_prefers_a_completion_to_itself() -> None:
    cands = [candidate(0, RIGHT, answer_agreement=0.5), candidate(1, RIGHT, answer_agreement=0.5)]
    record = request("tr-a", cands, chosen=[0])
    selection = select_examples([record], {"tr-a": [feedback_record("tr-a", 1.0)]}, SelectionConfig())
    assert texts(selection.examples) == [RIGHT]
    assert all(pair.chosen != pair.rejected for pair in selection.pairs)


def kept_examples(*texts: str, prompt: tuple = ()) -> list[Example]:
    return [Example(prompt, text, 1.0, "reference", f"tr-{i}") for i, text in enumerate(texts)]


def test_one_right_answer_is_paired_with_each_distinct_wrong_one_up_to_the_cap() -> None:
    wrong = ["The answer is 41.", "The answer is  41.", "The answer is 40.", "It is 6.", "It is 7."]
    pairs = preference_pairs((), kept_examples(RIGHT), wrong, max_pairs=3)
    # the whitespace variant of 41 is one reject; the cap stops at three pairs
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (RIGHT, "The answer is 41."),
        (RIGHT, "The answer is 40."),
        (RIGHT, "It is 6."),
    ]


def test_several_right_answers_share_one_wrong_one() -> None:
    pairs = preference_pairs((), kept_examples("42", "6 * 7 = 42", "forty-two"), ["41"], max_pairs=4)
    assert [(p.chosen, p.rejected, p.trace_id) for p in pairs] == [
        ("42", "41", "tr-0"),
        ("6 * 7 = 42", "41", "tr-1"),
        ("forty-two", "41", "tr-2"),
    ]


@pytest.mark.parametrize(("kept", "rejected"), [((), ["41"]), (("42",), []), (("42",), ["42", " 42 "])])
def test_no_pair_without_a_right_and_a_different_wrong_answer(kept: tuple[str, ...], rejected: list[str]) -> None:
    assert preference_pairs((), kept_examples(*kept), rejected, max_pairs=4) == []


def test_unsolved_prompts_are_those_with_a_reference_and_nothing_kept() -> None:
    requests = [
        request("tr-a", [candidate(0, WRONG)], question="Q solved later", reference="42"),
        request("tr-b", [candidate(0, RIGHT)], question="Q solved later", reference="42"),
        request(
            "tr-c",
            [candidate(0, WRONG), candidate(1, "The answer is 4", finish_reason="length")],
            question="Q wrong",
            reference="42",
        ),
        request("tr-d", [candidate(0, "The answer is 4", finish_reason="length")], question="Q cut", reference="42"),
        request("tr-e", [candidate(0, WRONG, answer_agreement=1.0)], question="Q no reference"),
    ]
    selection = select_examples(requests, {"tr-f": [feedback_record("tr-f", 1.0, reference="7")]}, SelectionConfig())
    assert [(u.prompt[-1]["content"], u.reference, u.trace_id) for u in selection.unsolved] == [
        ("Q wrong", "42", "tr-c"),
        ("Q cut", "42", "tr-d"),
    ]


def test_a_reference_posted_with_feedback_makes_a_prompt_rationalizable() -> None:
    record = request("tr-a", [candidate(0, WRONG)], question="Q")
    selection = select_examples([record], {"tr-a": [feedback_record("tr-a", 0.0, reference="43")]}, SelectionConfig())
    assert [(u.reference, u.trace_id) for u in selection.unsolved] == [("43", "tr-a")]


# --------------------------------------------------------------------------- journal on disk


def write_journal(directory: Path, records: list[dict[str, Any]]) -> None:
    """Write records like the server does; one record per segment, so joins must cross segments."""
    journal = TraceJournal(directory, max_segment_bytes=1, max_batch=1, flush_interval_s=0.0)
    journal.start()
    for record in records:
        journal.append(record)
    journal.close_sync()


def tear_last_segment(directory: Path, record: dict[str, Any]) -> None:
    """What kill -9 mid-write leaves: the first half of a line, without its newline."""
    line = json.dumps(record).encode()
    with open(iter_segment_paths(directory)[-1], "ab") as segment:
        segment.write(line[: len(line) // 2])


def journal_records() -> list[dict[str, Any]]:
    return [
        request("tr-fb", [candidate(0, WRONG, answer_agreement=1.0), candidate(1, RIGHT, answer_agreement=0.0)]),
        request("tr-err", [candidate(0, "The answer is 7.", answer_agreement=1.0)], question="Q err", status="error"),
        request(
            "tr-cxl", [candidate(0, "The answer is 8.", answer_agreement=1.0)], question="Q cxl", status="cancelled"
        ),
        request("tr-empty", [], question="Q empty"),
        request("tr-ref", [candidate(0, "The answer is 12.")], question="What is 3 * 4?", reference="12"),
        feedback_record("tr-fb", 1.0),
        feedback_record("tr-fb", 0.0, reference="42"),  # the latest: the chosen WRONG gets 0, RIGHT gets 1
        feedback_record("tr-nowhere", 1.0),
    ]


def test_load_journal_keeps_ok_requests_with_candidates_and_groups_feedback(tmp_path: Path) -> None:
    records = journal_records()
    write_journal(tmp_path, records)
    tear_last_segment(tmp_path, request("tr-torn", [candidate(0, RIGHT, answer_agreement=1.0)]))

    requests, feedback, stats = load_journal(str(tmp_path))
    assert [r["trace_id"] for r in requests] == ["tr-fb", "tr-ref"]
    assert requests[0] == json.loads(json.dumps(records[0]))
    assert {trace: [f["reward"] for f in fb] for trace, fb in feedback.items()} == {
        "tr-fb": [1.0, 0.0],
        "tr-nowhere": [1.0],
    }
    assert (stats.segments, stats.records, stats.skipped_lines) == (len(records), len(records), 1)


def test_select_from_journal_joins_feedback_and_skips_a_torn_line(tmp_path: Path) -> None:
    write_journal(tmp_path, journal_records())
    tear_last_segment(tmp_path, request("tr-torn", [candidate(0, RIGHT, answer_agreement=1.0)], question="Q torn"))

    selection = select_from_journal(str(tmp_path), SelectionConfig())
    assert sorted((e.completion, e.reward_source, e.trace_id) for e in selection.examples) == [
        ("The answer is 12.", "reference", "tr-ref"),
        (RIGHT, "reference", "tr-fb"),  # graded by the reference posted with the latest feedback
    ]
    assert selection.pairs == [PreferencePair(tuple(messages(SIX_SEVENS)), RIGHT, WRONG, "tr-fb")]
    assert selection.report.as_dict() == {
        "requests": 2,  # error, cancelled and candidate-less requests never reach the selection
        "feedback_records": 3,
        "candidates": 3,
        "skipped_lines": 1,
        "prompts": 2,
        "prompts_with_an_example": 2,
        "kept": 2,
        "pairs": 1,
        "prompts_with_a_pair": 1,
        "rejected": {"reward below threshold": 1},
        "reward_sources": {"reference": 2},
    }


def test_feedback_without_a_reference_rewards_the_chosen_candidate_from_the_journal(tmp_path: Path) -> None:
    records = [
        request("tr-a", [candidate(0, "The answer is 12.", answer_agreement=0.25), candidate(1, "12", logprob=1.0)]),
        feedback_record("tr-a", 1.0, comment="correct"),
        feedback_record("tr-b", 0.0),  # another request's feedback must not leak into tr-a
    ]
    write_journal(tmp_path, records)
    selection = select_from_journal(str(tmp_path), SelectionConfig())
    assert [(e.completion, e.reward, e.reward_source, e.trace_id) for e in selection.examples] == [
        ("The answer is 12.", 1.0, "feedback", "tr-a")
    ]
    assert selection.report.rejected == Counter({"no reward from the chosen source": 1})
    assert (selection.report.feedback_records, selection.report.skipped_lines) == (2, 0)


def test_a_missing_journal_selects_nothing(tmp_path: Path) -> None:
    selection = select_from_journal(str(tmp_path / "absent"), SelectionConfig())
    assert selection.examples == [] and selection.pairs == []
    assert selection.report.requests == 0 and selection.report.skipped_lines == 0


# --------------------------------------------------------------------------- TRL rows


def test_sft_rows_are_conversational_prompt_completion() -> None:
    prompt = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": SIX_SEVENS})
    examples = [Example(prompt, "The answer is 42.", 1.0, "reference", "tr-a")]
    rows = to_sft_rows(examples)
    assert rows == [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SIX_SEVENS}],
            "completion": [{"role": "assistant", "content": "The answer is 42."}],
        }
    ]
    assert all(type(m) is dict for m in rows[0]["prompt"])
    rows[0]["prompt"][1]["content"] = "changed"  # rows are copies: editing one leaves the example intact
    assert examples[0].prompt[1]["content"] == SIX_SEVENS


def test_preference_rows_are_conversational() -> None:
    prompt = ({"role": "user", "content": SIX_SEVENS},)
    rows = to_preference_rows([PreferencePair(prompt, "42", "41", "tr-a")])
    assert rows == [
        {
            "prompt": [{"role": "user", "content": SIX_SEVENS}],
            "chosen": [{"role": "assistant", "content": "42"}],
            "rejected": [{"role": "assistant", "content": "41"}],
        }
    ]


def test_selected_examples_become_rows_end_to_end() -> None:
    selection = select_examples(
        [request("tr-a", [candidate(0, " The answer is 42. ")], reference="42")], {}, SelectionConfig()
    )
    assert to_sft_rows(selection.examples) == [
        {"prompt": messages(SIX_SEVENS), "completion": [{"role": "assistant", "content": "The answer is 42."}]}
    ]
    assert to_preference_rows(selection.pairs) == []


# --------------------------------------------------------------------------- DistillConfig


@pytest.fixture(scope="module")
def distill_config():
    """Imported lazily: trl takes seconds to import and only these tests need it."""
    pytest.importorskip("trl")
    from training.distill import DistillConfig

    return DistillConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reward_source": "best"}, "reward_source"),
        ({"reward_source": "Feedback"}, "reward_source"),
        ({"threshold": -0.01}, "threshold"),
        ({"threshold": 1.01}, "threshold"),
        ({"max_per_prompt": 0}, "max_per_prompt"),
        ({"max_per_prompt": -3}, "max_per_prompt"),
    ],
)
def test_distill_config_rejects_bad_selection_options(distill_config, tmp_path: Path, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        distill_config(output_dir=str(tmp_path), **options)


@pytest.mark.parametrize("source", ["auto", "feedback", "reference", "verifier"])
def test_distill_config_accepts_the_edges_and_builds_the_selection(distill_config, tmp_path: Path, source) -> None:
    config = distill_config(
        output_dir=str(tmp_path), reward_source=source, verifier="logprob", threshold=0.0, max_per_prompt=1
    )
    assert config.selection() == SelectionConfig(
        reward_source=source, verifier="logprob", threshold=0.0, max_per_prompt=1
    )
    assert distill_config(output_dir=str(tmp_path), threshold=1.0).selection().threshold == 1.0


# --------------------------------------------------------------------------- PreferenceDistillConfig and rows


@pytest.fixture(scope="module")
def distill_module():
    pytest.importorskip("trl")
    from training import distill

    return distill


def test_method_picks_the_config_and_so_the_trainer(distill_module, tmp_path: Path) -> None:
    assert distill_module.config_class(["--output_dir", str(tmp_path)]) is distill_module.DistillConfig
    for method in ("dpo", "sft+dpo"):
        argv = ["--traces", "t", "--method", method, "--beta", "0.2"]
        assert distill_module.config_class(argv) is distill_module.PreferenceDistillConfig


def test_sft_plus_dpo_adds_trls_sft_loss_once(distill_module, tmp_path: Path) -> None:
    config_cls = distill_module.PreferenceDistillConfig
    assert config_cls(output_dir=str(tmp_path)).loss_type == ["sigmoid"]
    combined = config_cls(output_dir=str(tmp_path), method="sft+dpo")
    assert combined.loss_type == ["sigmoid", "sft"]
    weighted = config_cls(output_dir=str(tmp_path), method="sft+dpo", loss_type=["ipo", "sft"], loss_weights=[1, 2])
    assert (weighted.loss_type, weighted.loss_weights) == (["ipo", "sft"], [1, 2])
    assert config_cls(output_dir=str(tmp_path), method="sft+dpo", loss_type="ipo", loss_weights=[0.5]).loss_weights == [
        0.5,
        1.0,
    ]


@pytest.mark.parametrize(
    ("config", "options", "message"),
    [
        ("DistillConfig", {"method": "dpo"}, "method sft"),
        ("PreferenceDistillConfig", {"method": "sft"}, "method dpo or sft\\+dpo"),
        ("PreferenceDistillConfig", {"threshold": 2.0}, "threshold"),
        ("PreferenceDistillConfig", {"reward_source": "best"}, "reward_source"),
    ],
)
def test_each_config_refuses_the_other_method_and_bad_selections(distill_module, tmp_path, config, options, message):
    with pytest.raises(ValueError, match=message):
        getattr(distill_module, config)(output_dir=str(tmp_path), **options)


def test_dpo_rows_come_from_the_pairs_and_sft_rows_from_the_examples(distill_module, tmp_path: Path) -> None:
    selection = select_examples(
        [request("tr-a", [candidate(0, RIGHT), candidate(1, WRONG), candidate(2, "It is 40.")], reference="42")],
        {},
        SelectionConfig(),
    )
    dpo = distill_module.PreferenceDistillConfig(output_dir=str(tmp_path))
    assert distill_module.training_rows(dpo, selection) == [
        {
            "prompt": messages(SIX_SEVENS),
            "chosen": [{"role": "assistant", "content": RIGHT}],
            "rejected": [{"role": "assistant", "content": wrong}],
        }
        for wrong in (WRONG, "It is 40.")
    ]
    sft = distill_module.DistillConfig(output_dir=str(tmp_path))
    assert distill_module.training_rows(sft, selection) == [
        {"prompt": messages(SIX_SEVENS), "completion": [{"role": "assistant", "content": RIGHT}]}
    ]


def test_sft_rows_add_the_rationales_without_their_hint(distill_module, tmp_path: Path) -> None:
    from training.rationalize import write_rationales

    path = tmp_path / "rationales.jsonl"
    write_rationales([Example(tuple(messages("What is 9 * 9?")), "9 * 9 = 81", 1.0, "rationalization", "tr-r")], path)
    selection = select_examples([request("tr-a", [candidate(0, RIGHT)], reference="42")], {}, SelectionConfig())
    sft = distill_module.DistillConfig(output_dir=str(tmp_path), rationales=str(path))
    rows = distill_module.training_rows(sft, selection)
    assert [r["prompt"][-1]["content"] for r in rows] == [SIX_SEVENS, "What is 9 * 9?"]
    assert rows[1]["completion"] == [{"role": "assistant", "content": "9 * 9 = 81"}]
    dpo = distill_module.PreferenceDistillConfig(output_dir=str(tmp_path), rationales=str(path))
    assert distill_module.training_rows(dpo, selection) == []  # a rationale has no rejected side

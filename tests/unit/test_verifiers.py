"""Verifiers against a scripted engine: the contract every registered verifier keeps, then each one's scores."""

from __future__ import annotations

import math

import pytest

from server.engine import Generation, SamplingOptions
from strategies.base import Budget, Prompt, StrategyContext
from tests.fakes import NO_ID, TOY_HEADS, YES_ID, CharRenderer, ScriptedEngine, make_generation
from verifiers import VERIFIERS, build_verifiers
from verifiers.answer_agreement import agreement_scores
from verifiers.reference import reference_scores
from verifiers.self_judge import (
    JUDGE_TEMPLATE,
    MAX_ANSWER_CHARS,
    MAX_QUESTION_CHARS,
    NO_WORDS,
    YES_WORDS,
    p_yes,
    single_token_ids,
)

RENDERER = CharRenderer()
QUESTION = "What is 6 * 7?"
ALL_WORD_IDS = (250, 251, 252, 253)  # "Yes", " Yes", "No", " No" in CharRenderer


def make_prompt(reference: str | None = None, question: str = QUESTION) -> Prompt:
    messages = ({"role": "user", "content": question},)
    return Prompt(tuple(RENDERER.chat_ids(messages)), question, messages, reference)


def make_ctx(engine: ScriptedEngine, sampling: SamplingOptions | None = None) -> StrategyContext:
    sampling = sampling or SamplingOptions(max_tokens=64, temperature=0.7)
    return StrategyContext(
        engine=engine,
        verifiers=build_verifiers(),
        budget=Budget(max_samples=1, max_tokens=sampling.max_tokens),
        sampling=sampling,
        request_id="req-v",
        render_chat=RENDERER.chat_ids,
        encode=RENDERER.encode,
    )


def judge_by_answer(table: dict[str, float]):
    """A judge whose P(yes) depends on the proposed answer in its prompt."""

    def judge(prompt_text: str) -> float:
        proposed = prompt_text.split("Proposed answer: ", 1)[1].split("\n\nIs the proposed", 1)[0]
        return table[proposed]

    return judge


# ----------------------------------------------------------------------------------------------- the contract
CONTRACT_GENERATIONS = [
    make_generation("The answer is 42.", -0.2),
    make_generation("I get 41", -3.0),
    make_generation("", 0.0),  # no tokens, no answer
    make_generation("#### 42", -0.0),
    make_generation("x" * 50, -40.0),
]


# code_tests needs the request's tests, reward_model a model directory, checklist a scripted question list:
# each has its own test file.
@pytest.mark.parametrize("name", sorted(set(VERIFIERS) - {"code_tests", "reward_model", "checklist"}))
async def test_every_verifier_gives_one_score_in_0_1_per_candidate(name):
    engine = ScriptedEngine(
        judge=judge_by_answer({"The answer is 42.": 0.9, "I get 41": 0.2, "": 0.5, "#### 42": 1.0, "x" * 50: 0.0}),
        introspection=TOY_HEADS,  # for the introspection verifier; the others ignore it
    )
    ctx = make_ctx(engine)
    verifier = VERIFIERS[name]()
    scores = await verifier.score(ctx, make_prompt(reference="42"), CONTRACT_GENERATIONS)
    assert len(scores) == len(CONTRACT_GENERATIONS)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores), scores
    assert ctx.samples_drawn == 0  # verifying never spends the sample budget
    assert await verifier.score(ctx, make_prompt(reference="42"), []) == []
    verdicts = await verifier.verdicts(ctx, make_prompt(reference="42"), CONTRACT_GENERATIONS)
    assert [v.score for v in verdicts] == scores


def test_every_verifier_is_registered_under_its_name():
    assert set(VERIFIERS) >= {"logprob", "answer_agreement", "reference", "self_judge"}
    assert all(cls.name == name for name, cls in VERIFIERS.items())
    assert {name for name, cls in VERIFIERS.items() if cls.needs_reference} == {"reference"}


# ----------------------------------------------------------------------------------------------- logprob
async def test_logprob_is_exp_of_the_mean_token_logprob():
    generations = [
        Generation("abcd", (97, 98, 99, 100), "stop", -2.0),
        Generation("ab", (97, 98), "stop", -0.1),
        Generation("", (), "stop", 0.0),
        Generation("a", (97,), "length", 0.0),
    ]
    engine = ScriptedEngine()
    scores = await VERIFIERS["logprob"]().score(make_ctx(engine), make_prompt(), generations)
    assert scores == pytest.approx([math.exp(-0.5), math.exp(-0.05), 0.0, 1.0])
    assert engine.calls == []  # free: no engine call


# ----------------------------------------------------------------------------------------------- answer_agreement
def test_agreement_scores_are_shares_of_all_candidates():
    assert agreement_scores(["12", "12", "7", None]) == [0.5, 0.5, 0.25, 0.0]
    assert agreement_scores([None, None]) == [0.0, 0.0]
    assert agreement_scores(["a"]) == [1.0]


async def test_answer_agreement_compares_normalized_final_answers():
    texts = ["The answer is 1,200.", "#### 1200", "So it is 7", "", "Final answer: $1200"]
    generations = [make_generation(t) for t in texts]
    scores = await VERIFIERS["answer_agreement"]().score(make_ctx(ScriptedEngine()), make_prompt(), generations)
    assert scores == pytest.approx([0.6, 0.6, 0.2, 0.0, 0.6])


# ----------------------------------------------------------------------------------------------- reference
def test_reference_scores_match_the_final_answer():
    texts = ["The answer is 72.", "#### 72", "It is 71", "72 dollars", ""]
    assert reference_scores(texts, "She earns 9*8 = 72 dollars.\n#### 72") == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert reference_scores(texts, "72") == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert reference_scores(texts, "") == [0.0] * 5  # an empty reference matches nothing


async def test_reference_verifier_scores_against_the_prompts_reference():
    generations = [make_generation("The answer is 42."), make_generation("The answer is 24.")]
    verifier = VERIFIERS["reference"]()
    assert verifier.needs_reference is True
    scores = await verifier.score(make_ctx(ScriptedEngine()), make_prompt(reference="#### 42"), generations)
    assert scores == [1.0, 0.0]


async def test_reference_verifier_needs_a_reference():
    with pytest.raises(ValueError, match="needs a reference answer"):
        await VERIFIERS["reference"]().score(make_ctx(ScriptedEngine()), make_prompt(), [make_generation("42")])


# ----------------------------------------------------------------------------------------------- self_judge
def test_single_token_ids_finds_the_one_token_yes_and_no_words():
    assert single_token_ids(RENDERER.encode, YES_WORDS) == (250, 251)
    assert single_token_ids(RENDERER.encode, NO_WORDS) == (252, 253)
    assert single_token_ids(RENDERER.encode, ("yes", "no")) == ()


def test_p_yes_renormalizes_over_the_yes_and_no_ids():
    logprobs = {250: math.log(0.3), 251: math.log(0.1), 252: math.log(0.1), 7: math.log(0.5)}
    assert p_yes(logprobs, (250, 251), (252, 253)) == pytest.approx(0.8)
    assert p_yes({252: math.log(0.2)}, (250, 251), (252, 253)) == 0.0
    assert p_yes({7: 0.0}, (250, 251), (252, 253)) == 0.5  # neither word seen: no opinion


async def test_self_judge_reads_p_yes_from_one_judge_call_per_candidate():
    answers = {"The answer is 42.": 0.9, "The answer is 41.": 0.25, "It is 42": 0.6}
    engine = ScriptedEngine(judge=judge_by_answer(answers))
    sampling = SamplingOptions(max_tokens=64, temperature=0.7, stop=("\n",), logit_bias=((5, 2.0),), top_p=0.9)
    ctx = make_ctx(engine, sampling)
    generations = [make_generation(f"  {text}\n") for text in answers]

    scores = await VERIFIERS["self_judge"]().score(ctx, make_prompt(), generations)

    assert scores == pytest.approx(list(answers.values()))
    judge_calls = engine.calls_of("generate")
    assert len(judge_calls) == len(generations) == len(engine.calls)
    expected_options = sampling.replace(
        max_tokens=1, temperature=0.0, stop=(), logit_bias=(), logprob_token_ids=ALL_WORD_IDS
    )
    assert all(c.n == 1 and c.options == expected_options for c in judge_calls)
    expected_prompts = {
        RENDERER.render_chat([{"role": "user", "content": JUDGE_TEMPLATE.format(question=QUESTION, answer=text)}])
        for text in answers  # the candidate, stripped
    }
    assert {c.prompt_text for c in judge_calls} == expected_prompts
    # counted as judge calls: their tokens are spent, the sample budget is not
    assert [(c.kind, c.n, c.generated_tokens) for c in ctx.calls] == [("judge", 1, 1)] * 3
    assert ctx.generated_tokens == 3
    assert ctx.samples_drawn == 0


async def test_self_judge_renormalizes_the_tracked_logprobs_of_its_verdict():
    tracked = {YES_ID: math.log(0.3), 251: math.log(0.1), NO_ID: math.log(0.1), 253: math.log(0.0001)}
    verdict = Generation("Yes", (YES_ID,), "length", math.log(0.3), tracked_logprobs=(tracked,))
    silent = Generation("Yes", (YES_ID,), "length", -1.0, tracked_logprobs=())
    engine = ScriptedEngine([verdict, silent])
    scores = await VERIFIERS["self_judge"]().score(make_ctx(engine), make_prompt(), [make_generation("42")] * 2)
    assert scores == pytest.approx([0.4 / 0.5001, 0.5])


async def test_self_judge_shows_the_judge_only_the_end_of_a_long_answer():
    long_answer = "a" * MAX_ANSWER_CHARS + "The answer is 42."
    engine = ScriptedEngine(judge=0.5)
    await VERIFIERS["self_judge"]().score(make_ctx(engine), make_prompt(), [make_generation(long_answer)])
    (call,) = engine.calls
    shown = call.prompt_text.split("Proposed answer: ", 1)[1].split("\n\nIs the proposed", 1)[0]
    assert shown == long_answer[-MAX_ANSWER_CHARS:]
    assert shown.endswith("The answer is 42.") and len(shown) == MAX_ANSWER_CHARS


async def test_self_judge_shows_the_judge_only_the_end_of_a_long_question():
    long_question = "b" * MAX_QUESTION_CHARS + "What is 6 * 7?"
    engine = ScriptedEngine(judge=0.5)
    await VERIFIERS["self_judge"]().score(
        make_ctx(engine), make_prompt(question=long_question), [make_generation("42")]
    )
    (call,) = engine.calls
    shown = call.prompt_text.split("Question: ", 1)[1].split("\n\nProposed answer: ", 1)[0]
    assert shown == long_question[-MAX_QUESTION_CHARS:]
    assert shown.endswith("What is 6 * 7?") and len(shown) == MAX_QUESTION_CHARS

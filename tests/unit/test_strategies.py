"""Strategies against a scripted engine: the contract every registered strategy keeps, then each one's own rules."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pytest

from server.engine import Engine, EngineDeadError, Generation, GenerationDelta, SamplingOptions
from strategies import STRATEGIES
from strategies.base import (
    NEW_SAMPLE_KINDS,
    Budget,
    BudgetExceeded,
    DeadlineExceeded,
    Prompt,
    Result,
    StrategyContext,
    StrategyOptions,
    argmax,
)
from strategies.best_of_n import BestOfN, BestOfNOptions
from strategies.options import DEFAULT_SEARCH_TEMPERATURE
from strategies.self_consistency import SelfConsistency, SelfConsistencyOptions, majority_choice
from strategies.single import Single
from tests.fakes import TOY_HEADS, CharRenderer, ScriptedEngine, make_generation
from verifiers import VERIFIERS, build_verifiers
from verifiers.base import Verifier

RENDERER = CharRenderer()
QUESTION = "What is 6 * 7?"
# Option fields that name a verifier; the contract runs each strategy once per verifier for each of them.
VERIFIER_FIELDS = ("verifier", "tie_break")


class FixedScores(Verifier):
    """A verifier whose scores the test chooses, one per candidate in order."""

    name = "fixed"
    description = "scores given by the test"

    def __init__(self, scores: Sequence[float]) -> None:
        self.scores = list(scores)
        self.seen: list[str] = []

    async def score(self, ctx, prompt, generations):
        self.seen = [g.text for g in generations]
        return self.scores[: len(generations)]


def make_prompt(question: str = QUESTION, reference: str | None = None) -> Prompt:
    messages = ({"role": "user", "content": question},)
    return Prompt(tuple(RENDERER.chat_ids(messages)), question, messages, reference)


def make_ctx(
    engine: ScriptedEngine,
    *,
    max_samples: int = 4,
    sampling: SamplingOptions | None = None,
    verifiers: dict[str, Verifier] | None = None,
    deadline: float | None = None,
    on_delta=None,
) -> StrategyContext:
    sampling = sampling or SamplingOptions(max_tokens=64, temperature=0.7)
    return StrategyContext(
        engine=engine,
        verifiers=verifiers if verifiers is not None else build_verifiers(),
        budget=Budget(max_samples=max_samples, max_tokens=sampling.max_tokens, deadline=deadline),
        sampling=sampling,
        request_id="req-1",
        render_chat=RENDERER.chat_ids,
        encode=RENDERER.encode,
        on_delta=on_delta,
    )


class DeltaCollector:
    def __init__(self) -> None:
        self.deltas: list[GenerationDelta] = []

    async def __call__(self, delta: GenerationDelta) -> None:
        self.deltas.append(delta)

    def text(self, index: int) -> str:
        return "".join(d.text for d in self.deltas if d.index == index)


def test_the_fakes_satisfy_the_engine_protocol():
    assert isinstance(ScriptedEngine(), Engine)
    assert RENDERER.encode("Yes") == [250] and RENDERER.encode(" No") == [253]
    assert RENDERER.encode("yes") == [ord("y"), ord("e"), ord("s")]
    assert RENDERER.decode(RENDERER.chat_ids([{"role": "user", "content": "hi"}])) == "user: hi\nassistant: "


async def test_the_scripted_engine_records_aborts_health_and_shutdown():
    engine = ScriptedEngine()
    assert await engine.prompt_logprobs([1, 2, 3], "r-1") == [0.0, -1.0, -1.0]
    assert [(c.method, c.prompt_ids, c.request_id) for c in engine.calls] == [("prompt_logprobs", (1, 2, 3), "r-1")]
    await engine.abort(["r-1", "r-2"])
    assert engine.aborted == ["r-1", "r-2"]
    await engine.check_health()
    engine.dead = True
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        await engine.generate([1], SamplingOptions(max_tokens=4), 1, "r-3")
    await engine.shutdown()
    assert engine.is_shut_down


# ----------------------------------------------------------------------------------------------- the contract
# Verifiers that score any text with nothing but the engine. code_tests needs the request's tests, reward_model a
# model directory, and checklist writes its questions with a free-form judge call this fake does not script:
# each has its own test file.
CONTRACT_VERIFIERS = sorted(set(VERIFIERS) - {"code_tests", "reward_model", "checklist"})


def contract_cases() -> list[tuple[str, dict[str, str]]]:
    cases = []
    for name, cls in sorted(STRATEGIES.items()):
        fields = [f for f in VERIFIER_FIELDS if f in cls.Options.model_fields]
        cases.append((name, {}))
        cases += [(name, {field: verifier}) for field in fields for verifier in CONTRACT_VERIFIERS]
    return cases


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("name", "option_values"), contract_cases())
async def test_every_strategy_keeps_the_contract(name, option_values, streaming):
    strategy = STRATEGIES[name]()
    options = strategy.Options(**option_values)
    request_n = 2 if strategy.returns_every_sample else 1
    planned = strategy.planned_samples(options, request_n)
    texts = ["The answer is 42.", "I think it is 41", "#### 42", "", "42, surely"]
    engine = ScriptedEngine(texts, judge=0.7, introspection=TOY_HEADS)  # a model with heads, as the server has
    collector = DeltaCollector()
    sampling = SamplingOptions(max_tokens=64, temperature=0.7, logprob_token_ids=TOY_HEADS.token_ids)
    ctx = make_ctx(engine, max_samples=planned, sampling=sampling, on_delta=collector if streaming else None)

    result = await strategy.run(ctx, make_prompt(reference="42"), options)

    assert isinstance(result, Result)
    assert [c.index for c in result.candidates] == list(range(len(result.candidates)))
    assert len(result.chosen) == (request_n if strategy.returns_every_sample else 1)
    assert len(set(result.chosen)) == len(result.chosen)
    assert all(0 <= i < len(result.candidates) for i in result.chosen)
    assert all(0.0 <= v <= 1.0 for c in result.candidates for v in c.scores.values())
    # every engine call is recorded, with its kind, and every generated token is counted
    assert len(ctx.calls) == len(engine.calls) >= 1
    assert sorted(c.kind == "judge" for c in ctx.calls) == sorted(c.is_judge for c in engine.calls)
    assert sorted(c.n for c in ctx.calls) == sorted(c.n for c in engine.calls)
    assert ctx.generated_tokens == engine.generated_tokens
    assert ctx.generated_tokens == sum(c.generated_tokens for c in ctx.calls)
    # within the budget
    sampled = sum(c.n for c in ctx.calls if c.kind in NEW_SAMPLE_KINDS)  # continuing a sample is not a new one
    assert ctx.samples_drawn == sampled <= planned
    assert all(c.options.max_tokens <= ctx.budget.max_tokens for c in engine.calls)
    # engine request ids are unique and name the request
    ids = [c.request_id for c in engine.calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("req-1-") for i in ids)
    # only what was streamed says so, and what was streamed is what was returned
    assert result.streamed == bool(collector.deltas)
    if result.streamed:
        assert [collector.text(k) for k in range(len(result.chosen))] == [
            result.candidates[i].text for i in result.chosen
        ]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
async def test_every_strategy_stays_inside_a_budget_smaller_than_its_plan(name):
    strategy = STRATEGIES[name]()
    options = strategy.Options()
    budget = strategy.planned_samples(options, 3) - 1
    engine = ScriptedEngine(judge=0.5, introspection=TOY_HEADS)
    sampling = SamplingOptions(max_tokens=64, temperature=0.7, logprob_token_ids=TOY_HEADS.token_ids)
    ctx = make_ctx(engine, max_samples=budget, sampling=sampling)
    try:
        result = await strategy.run(ctx, make_prompt(), options)
    except BudgetExceeded as exc:  # refused by ctx.sample, never overspent
        assert f"over the budget of {budget}" in str(exc)
    else:
        assert result.chosen and all(0 <= i < len(result.candidates) for i in result.chosen)
    assert sum(c.n for c in ctx.calls if c.kind in NEW_SAMPLE_KINDS) == ctx.samples_drawn <= budget


@pytest.mark.parametrize(
    ("strategy", "options"),
    [(BestOfN(), BestOfNOptions(n=3)), (SelfConsistency(), SelfConsistencyOptions(n=3)), (Single(), None)],
    ids=["best_of_n", "self_consistency", "single"],
)
async def test_a_strategy_given_two_samples_for_three_refuses_or_returns_two(strategy, options):
    engine = ScriptedEngine()
    ctx = make_ctx(engine, max_samples=2)
    if strategy.returns_every_sample:  # the budget is the request's n: that many samples come back
        result = await strategy.run(ctx, make_prompt(), StrategyOptions())
        assert result.chosen == (0, 1)
        assert [(c.method, c.n) for c in engine.calls] == [("generate", 2)]
    else:
        with pytest.raises(BudgetExceeded, match=r"^3 more samples would make 3, over the budget of 2$"):
            await strategy.run(ctx, make_prompt(), options)
        assert engine.calls == []


# ----------------------------------------------------------------------------------------------- budget
async def test_sample_past_max_samples_raises_with_the_numbers():
    engine = ScriptedEngine()
    ctx = make_ctx(engine, max_samples=4)
    prompt_ids = make_prompt().token_ids
    assert len(await ctx.sample(prompt_ids, 3)) == 3
    with pytest.raises(BudgetExceeded, match=r"^2 more samples would make 5, over the budget of 4$"):
        await ctx.sample(prompt_ids, 2)
    assert ctx.samples_drawn == 3
    assert len(engine.calls) == 1  # the refused call never reached the engine
    assert len(await ctx.sample(prompt_ids, 1)) == 1
    assert ctx.samples_drawn == 4


async def test_stream_samples_count_against_the_same_budget():
    ctx = make_ctx(ScriptedEngine(), max_samples=2, on_delta=DeltaCollector())
    await ctx.stream_samples(make_prompt().token_ids, 2)
    with pytest.raises(BudgetExceeded, match="1 more samples would make 3, over the budget of 2"):
        await ctx.stream_samples(make_prompt().token_ids, 1)


async def test_judge_calls_do_not_count_against_the_sample_budget():
    engine = ScriptedEngine(judge=0.5)
    ctx = make_ctx(engine, max_samples=1)
    await ctx.sample(make_prompt().token_ids, 1)
    judge_options = ctx.sampling.replace(max_tokens=1, logprob_token_ids=(250, 252))
    await ctx.sample(make_prompt().token_ids, 1, judge_options, kind="judge")
    await ctx.sample(make_prompt().token_ids, 1, judge_options, kind="judge")
    assert ctx.samples_drawn == 1
    assert [c.kind for c in ctx.calls] == ["sample", "judge", "judge"]


@pytest.mark.parametrize("kind", ["sample", "judge"])
async def test_a_passed_deadline_raises_before_calling_the_engine(kind):
    engine = ScriptedEngine()
    ctx = make_ctx(engine, deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded, match="the request's deadline has passed"):
        await ctx.sample(make_prompt().token_ids, 1, kind=kind)
    assert engine.calls == []


async def test_a_deadline_that_passes_while_sampling_raises():
    engine = ScriptedEngine(delay_s=2.0)
    ctx = make_ctx(engine, deadline=time.monotonic() + 0.05)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="the request's deadline passed while sampling"):
        await ctx.sample(make_prompt().token_ids, 1)
    assert time.monotonic() - started < 1.0
    # The cut-off call is still on the books, with the tokens the engine reported before it was cancelled.
    assert [(c.kind, c.n) for c in ctx.calls] == [("sample", 1)] and ctx.calls[0].generated_tokens > 0
    assert engine.aborted == ["req-1-sample-1"]  # the engine request was cancelled, not left running


async def test_a_deadline_that_passes_while_streaming_raises_and_counts_what_was_streamed():
    engine = ScriptedEngine(["abcdef"], delay_s=0.2)  # three deltas of 2 tokens, at 0.2 s, 0.4 s and 0.6 s
    collector = DeltaCollector()
    ctx = make_ctx(engine, deadline=time.monotonic() + 0.5, on_delta=collector)
    with pytest.raises(DeadlineExceeded, match="the request's deadline passed while streaming"):
        await ctx.stream_samples(make_prompt().token_ids, 1)
    assert collector.text(0) == "abcd"
    assert [(c.kind, c.n, c.generated_tokens) for c in ctx.calls] == [("stream", 1, 4)]
    assert engine.aborted == ["req-1-stream-1"]


def test_argmax_takes_the_first_of_equal_values():
    assert argmax([0.1, 0.7, 0.7, 0.2]) == 1
    assert argmax([0.3]) == 0
    assert argmax([-1.0, -0.5, -2.0]) == 1


# ----------------------------------------------------------------------------------------------- best_of_n
@pytest.mark.parametrize(
    ("scores", "expected"),
    [([0.2, 0.9, 0.4, 0.1], 1), ([0.2, 0.9, 0.9, 0.1], 1), ([0.5, 0.5, 0.5, 0.5], 0), ([0.0, 0.0, 0.0, 0.3], 3)],
)
async def test_best_of_n_returns_the_argmax_of_the_verifier_first_on_ties(scores, expected):
    texts = ["a", "b", "c", "d"]
    engine = ScriptedEngine(texts)
    verifier = FixedScores(scores)
    ctx = make_ctx(engine, verifiers={"fixed": verifier})
    result = await BestOfN().run(ctx, make_prompt(), BestOfNOptions(n=4, verifier="fixed"))
    assert result.chosen == (expected,)
    assert result.the_one.text == texts[expected]
    assert [dict(c.scores) for c in result.candidates] == [{"fixed": s} for s in scores]
    assert verifier.seen == texts
    assert [(c.method, c.n) for c in engine.calls] == [("generate", 4)]
    assert ctx.samples_drawn == 4


async def test_best_of_n_with_the_logprob_verifier_picks_the_most_confident_sample():
    generations = [make_generation("low", -2.0), make_generation("high", -0.1), make_generation("mid", -1.0)]
    ctx = make_ctx(ScriptedEngine(generations), max_samples=3)
    result = await BestOfN().run(ctx, make_prompt(), BestOfNOptions(n=3, verifier="logprob"))
    assert result.the_one.text == "high"
    assert [c.scores["logprob"] for c in result.candidates] == pytest.approx([math.exp(x) for x in (-2, -0.1, -1)])


@pytest.mark.parametrize(
    ("requested", "option", "expected"),
    [(0.0, None, DEFAULT_SEARCH_TEMPERATURE), (0.5, None, 0.5), (0.0, 0.3, 0.3), (1.2, 0.0, 0.0)],
)
@pytest.mark.parametrize("strategy", [BestOfN(), SelfConsistency()], ids=lambda s: s.name)
async def test_search_strategies_sample_at_the_option_temperature_else_the_request_one_else_0_8(
    strategy, requested, option, expected
):
    engine = ScriptedEngine()
    sampling = SamplingOptions(max_tokens=32, temperature=requested, top_p=0.9, stop=("\n\n",))
    ctx = make_ctx(engine, sampling=sampling)
    await strategy.run(ctx, make_prompt(), strategy.Options(n=2, temperature=option))
    (call,) = engine.calls_of("generate")
    assert call.options == sampling.replace(temperature=expected)
    assert DEFAULT_SEARCH_TEMPERATURE == 0.8


# ----------------------------------------------------------------------------------------------- self_consistency
@pytest.mark.parametrize(
    ("answers", "scores", "expected_index", "expected_votes"),
    [
        (["12", "7", "12"], [0.9, 0.95, 0.1], 0, {"12": 2, "7": 1}),  # majority beats a better single score
        (["12", "7", "12"], [0.1, 0.95, 0.9], 2, {"12": 2, "7": 1}),  # best path inside the winning answer
        (["12", "7", "12", "7"], [0.1, 0.5, 0.2, 0.9], 3, {"12": 2, "7": 2}),  # tie: best single score wins
        (["12", "7", "12", "7"], [0.1, 0.5, 0.95, 0.9], 2, {"12": 2, "7": 2}),
        (["a", "b"], [0.5, 0.5], 0, {"a": 1, "b": 1}),  # full tie: the first answer
        ([None, None, None, "5"], [0.9, 0.9, 0.9, 0.1], 3, {"5": 1}),  # no answer, no vote
        ([None, None, None], [0.2, 0.7, 0.7], 1, {}),  # nobody answered: best score, first on ties
    ],
)
def test_majority_choice(answers, scores, expected_index, expected_votes):
    assert majority_choice(answers, scores) == (expected_index, expected_votes)


async def test_self_consistency_returns_a_majority_answer_and_records_the_votes():
    texts = ["The answer is 1,200.", "So the answer is 7.", "#### 1200", "Final answer: $1200", "7"]
    engine = ScriptedEngine(texts)
    scores = [0.2, 0.9, 0.1, 0.6, 0.8]
    ctx = make_ctx(engine, max_samples=5, verifiers={"fixed": FixedScores(scores)})
    result = await SelfConsistency().run(ctx, make_prompt(), SelfConsistencyOptions(n=5, tie_break="fixed"))
    assert result.chosen == (3,)  # "1200" has 3 votes; its best-scoring path is index 3
    assert result.details == {"votes": {"1200": 3, "7": 2}}
    assert [c.answer for c in result.candidates] == ["1200", "7", "1200", "1200", "7"]
    assert [c.scores for c in result.candidates] == [{"fixed": s} for s in scores]
    assert [(c.method, c.n) for c in engine.calls] == [("generate", 5)]


async def test_self_consistency_breaks_a_tie_between_answers_by_the_tie_break_score():
    texts = ["The answer is 3.", "The answer is 4.", "The answer is 3.", "The answer is 4."]
    ctx = make_ctx(ScriptedEngine(texts), verifiers={"fixed": FixedScores([0.3, 0.2, 0.4, 0.8])})
    result = await SelfConsistency().run(ctx, make_prompt(), SelfConsistencyOptions(n=4, tie_break="fixed"))
    assert result.chosen == (3,)
    assert result.details == {"votes": {"3": 2, "4": 2}}


async def test_self_consistency_paths_without_an_answer_do_not_vote():
    texts = ["", "  ", "\n", "The answer is 5."]
    ctx = make_ctx(ScriptedEngine(texts), verifiers={"fixed": FixedScores([0.9, 0.9, 0.9, 0.1])})
    result = await SelfConsistency().run(ctx, make_prompt(), SelfConsistencyOptions(n=4, tie_break="fixed"))
    assert result.chosen == (3,)
    assert [c.answer for c in result.candidates] == [None, None, None, "5"]
    assert result.details == {"votes": {"5": 1}}


async def test_self_consistency_with_no_answers_falls_back_to_the_best_score():
    texts = ["", " ", "", "\n"]
    ctx = make_ctx(ScriptedEngine(texts), verifiers={"fixed": FixedScores([0.1, 0.3, 0.9, 0.9])})
    result = await SelfConsistency().run(ctx, make_prompt(), SelfConsistencyOptions(n=4, tie_break="fixed"))
    assert result.chosen == (2,)
    assert result.details == {"votes": {}}


# ----------------------------------------------------------------------------------------------- single
async def test_single_returns_the_requests_n_samples_from_one_call():
    texts = ["one", "two", "three"]
    engine = ScriptedEngine(texts)
    ctx = make_ctx(engine, max_samples=3)
    result = await Single().run(ctx, make_prompt(), StrategyOptions())
    assert result.chosen == (0, 1, 2)
    assert [c.text for c in result.candidates] == texts
    assert result.streamed is False
    assert [(c.method, c.n, c.options) for c in engine.calls] == [("generate", 3, ctx.sampling)]
    assert [(c.kind, c.n, c.generated_tokens) for c in ctx.calls] == [("sample", 3, 11)]


async def test_single_streams_its_samples_through_on_delta():
    texts = ["The answer is 42.", "Forty-two"]
    engine = ScriptedEngine(texts)
    collector = DeltaCollector()
    ctx = make_ctx(engine, max_samples=2, on_delta=collector)
    result = await Single().run(ctx, make_prompt(), StrategyOptions())
    assert result.streamed is True
    assert result.chosen == (0, 1)
    assert [collector.text(0), collector.text(1)] == texts
    assert len([d for d in collector.deltas if d.index == 0]) == 3  # a few deltas each, not one
    assert [d.finish_reason for d in collector.deltas if d.finish_reason] == ["stop", "stop"]
    generations: list[Generation] = [c.generation for c in result.candidates]
    assert [g.text for g in generations] == texts
    assert [g.token_ids for g in generations] == [tuple(RENDERER.encode(t)) for t in texts]
    assert [g.cumulative_logprob for g in generations] == pytest.approx([-0.5 * len(t) for t in texts])
    assert [g.finish_reason for g in generations] == ["stop", "stop"]
    assert [(c.method, c.n) for c in engine.calls] == [("stream", 2)]
    assert [(c.kind, c.n, c.generated_tokens) for c in ctx.calls] == [("stream", 2, 26)]
    assert ctx.samples_drawn == 2

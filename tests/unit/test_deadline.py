"""Per-request deadlines: a 504, or the best answer so far (strategies/deadline.py), as the request asks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from server.engine import Generation, SamplingOptions
from server.protocol import ChatCompletionRequest
from server.serving import resolve_deadline
from server.trace_journal import read_records
from strategies import STRATEGIES
from strategies.base import AnswerSoFar
from strategies.deadline import pick_answer, result_from_answers
from tests.fakes import CharRenderer, ScriptedEngine, make_generation
from tests.unit import test_http_api as http_api

RENDERER = CharRenderer()
BEST_SO_FAR = {"deadline_s": 0.3, "on_deadline": "best_so_far"}


def answer(text: str, finish: str = "stop", logprob: float = -1.0, index: int = 0, score: float | None = None):
    ids = tuple(RENDERER.encode(text))
    return AnswerSoFar(index, Generation(text, ids, finish, logprob * len(ids)), score)


class SlowJudgeEngine(ScriptedEngine):
    """Samples come at once; a judge's verdict (a call tracking log-probs) takes `judge_delay_s`."""

    def __init__(self, *args, judge_delay_s: float = 5.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.judge_delay_s = judge_delay_s

    async def generate(self, prompt_ids: Sequence[int], options: SamplingOptions, n: int, request_id: str, **kw):
        if options.logprob_token_ids:
            await asyncio.sleep(self.judge_delay_s)
        return await super().generate(prompt_ids, options, n, request_id, **kw)


# ---------------------------------------------------------------------------------------------- choosing
def test_finished_answers_vote_and_ties_go_to_the_score_then_the_logprob():
    answers = [
        answer("The answer is 41.", logprob=-0.1),
        answer("The answer is 42.", logprob=-2.0),
        answer("#### 42", logprob=-1.5),
        answer("The answer is 4", finish="abort", logprob=-0.01),  # cut: it does not vote
    ]
    assert pick_answer(answers) == 2  # 42 wins two votes to one; of its two, the better mean log-prob
    scored = [answer("The answer is 41.", score=0.9), answer("The answer is 42.", score=0.2)]
    assert pick_answer(scored) == 0  # one vote each: the strategy's score decides


def test_with_no_finished_answer_the_longest_cut_one_is_returned():
    answers = [answer("The ans", "abort"), answer("The answer i", "abort"), answer("Th", "abort")]
    assert pick_answer(answers) == 1


def test_a_strategy_returning_every_sample_returns_them_all_in_index_order():
    result = result_from_answers([answer("b", index=1), answer("a", "abort", index=0)], returns_every_sample=True)
    assert result is not None
    assert [c.text for c in result.candidates] == ["a", "b"] and result.chosen == (0, 1)
    assert result_from_answers([], returns_every_sample=False) is None
    cut_at_once = [answer("", "abort", index=0), answer("", "abort", index=1)]  # no token before the deadline
    assert result_from_answers(cut_at_once, returns_every_sample=True) is None
    assert result_from_answers(cut_at_once, returns_every_sample=False) is None


def test_the_deadline_comes_from_the_header_then_the_body_capped_by_the_server():
    body = ChatCompletionRequest.model_validate(http_api.CHAT | {"deadline_s": 5, "on_deadline": "error"})
    assert resolve_deadline(None, None, body, None) == (5, "error")
    assert resolve_deadline("2.5", "best_so_far", body, None) == (2.5, "best_so_far")
    assert resolve_deadline(None, None, body, 1.0) == (1.0, "error")  # the server's timeout caps the request's
    no_deadline = ChatCompletionRequest.model_validate(http_api.CHAT)
    assert resolve_deadline(None, None, no_deadline, None) == (None, "error")
    assert resolve_deadline(None, None, no_deadline, 3.0) == (3.0, "error")


@pytest.mark.parametrize("keeps_answers", [False, True])
async def test_answers_are_kept_only_for_a_request_that_wants_the_best_so_far(keeps_answers):
    from strategies.base import Budget, StrategyContext

    ctx = StrategyContext(
        engine=ScriptedEngine(["The answer is 42."]),
        verifiers={},
        budget=Budget(max_samples=3, max_tokens=32),
        sampling=SamplingOptions(max_tokens=32),
        request_id="r",
        render_chat=RENDERER.chat_ids,
        encode=RENDERER.encode,
        keeps_answers=keeps_answers,
    )
    await ctx.sample((1, 2), 2, answers=True)
    await ctx.sample((1, 2), 1, kind="judge")  # never an answer
    assert len(ctx.answers_so_far) == (2 if keeps_answers else 0)


# ---------------------------------------------------------------------------------------------- over HTTP
def test_the_default_is_a_504_that_says_not_to_retry(tmp_path):
    with http_api.serve(tmp_path, ScriptedEngine(script=http_api.scripted, delay_s=2.0)) as client:
        response = http_api.chat(client, strategy="best_of_n", deadline_s=0.1)
        http_api.assert_openai_error(response, 504, param=None, code="deadline_exceeded", says="deadline")
        assert response.headers["x-should-retry"] == "false"
        assert "X-Deadline-Exceeded" not in response.headers
        samples = http_api.metric_samples(client)
    assert (
        samples[("ponder_deadline_exceeded_total", frozenset({("strategy", "best_of_n"), ("outcome", "error")}))] == 1
    )
    (record,) = read_records(tmp_path / "traces")
    assert record["status"] == "error" and "deadline" in record["error"]


def test_samples_cut_by_the_deadline_are_the_best_so_far(tmp_path):
    engine = ScriptedEngine(script=http_api.scripted, delay_s=2.0)
    with http_api.serve(tmp_path, engine) as client:
        response = http_api.chat(client, strategy={"name": "best_of_n", "n": 4}, **BEST_SO_FAR)
        assert response.status_code == 200, response.text
        assert response.headers["X-Deadline-Exceeded"] == "best_so_far"
        (choice,) = response.json()["choices"]
        assert choice["finish_reason"] == "length"  # cut, not finished
        # the scripted engine cuts each sample halfway: the longest half is returned
        halves = [make_generation(t).token_ids[: len(RENDERER.encode(t)) // 2] for t in http_api.TEXTS[:4]]
        longest = max(halves, key=len)
        assert choice["message"]["content"] == RENDERER.decode(longest)
        trace = http_api.trace_of(client, response)
        samples = http_api.metric_samples(client)
    deadline = trace["details"]["deadline"]
    assert deadline == {
        "exceeded": True,
        "returned": "best_so_far",
        "from": "answers",
        "complete": False,
        "answers_so_far": 4,
    }
    assert trace["status"] == "ok" and len(trace["candidates"]) == 4
    key = ("ponder_deadline_exceeded_total", frozenset({("strategy", "best_of_n"), ("outcome", "best_so_far")}))
    assert samples[key] == 1


def test_finished_samples_win_when_the_verifier_runs_out_of_time(tmp_path):
    engine = SlowJudgeEngine(script=http_api.scripted, judge=http_api.judge)
    with http_api.serve(tmp_path, engine) as client:
        strategy = {"name": "best_of_n", "n": 5, "verifier": "self_judge"}
        response = http_api.chat(client, strategy=strategy, **BEST_SO_FAR)
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        trace = http_api.trace_of(client, response)
    # the five samples finished; the judge did not: they vote, and 42 (three of five) wins
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] in {t for t in http_api.TEXTS if "42" in t}
    assert trace["details"]["deadline"]["complete"] is True
    assert trace["details"]["votes"] == {"42": 3, "41": 1, "no idea": 1}
    kinds = [c["kind"] for c in trace["engine_calls"]]
    assert kinds[0] == "sample" and set(kinds[1:]) == {"judge"}  # one verdict per sample, all cut


def test_reflection_returns_its_draft_when_the_review_runs_out_of_time(tmp_path):
    engine = SlowJudgeEngine(script=http_api.scripted, judge=http_api.judge)
    with http_api.serve(tmp_path, engine) as client:
        strategy = {"name": "reflection", "verifier": "self_judge", "max_rounds": 3}
        response = http_api.chat(client, strategy=strategy, **BEST_SO_FAR)
        assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == http_api.TEXTS[0]


def test_tree_search_answers_from_its_tree(tmp_path):
    engine = SlowJudgeEngine(script=http_api.scripted, judge=http_api.judge)
    with http_api.serve(tmp_path, engine) as client:
        strategy = {"name": "tree_search", "mode": "beam", "n": 4, "beam_width": 2, "value": "self_judge"}
        response = http_api.chat(client, strategy=strategy, **BEST_SO_FAR)
        assert response.status_code == 200, response.text
        trace = http_api.trace_of(client, response)
    assert trace["details"]["deadline"]["from"] == "strategy"
    assert trace["details"]["stopped_because"] == "deadline"
    assert len(trace["details"]["nodes"]) > 1  # the first steps were drawn; valuing them ran out of time


def test_nothing_drawn_yet_is_a_504_that_says_so(tmp_path):
    with http_api.serve(tmp_path, ScriptedEngine(script=http_api.scripted, delay_s=2.0)) as client:
        # tree search's first steps are cut: its tree has no node, and a step is not an answer
        strategy = {"name": "tree_search", "mode": "beam", "n": 4, "beam_width": 2}
        response = http_api.chat(client, strategy=strategy, deadline_s=0.1, on_deadline="best_so_far")
    http_api.assert_openai_error(response, 504, param=None, code="deadline_exceeded", says="before the strategy")


def test_the_header_sets_the_deadline_and_a_bad_one_is_a_400(tmp_path):
    engine = ScriptedEngine(script=http_api.scripted, delay_s=2.0)
    with http_api.serve(tmp_path, engine) as client:
        headers = {"X-Deadline": "0.2", "X-On-Deadline": "best_so_far"}
        response = http_api.chat(client, headers=headers, strategy="self_consistency")
        assert response.status_code == 200 and response.headers["X-Deadline-Exceeded"] == "best_so_far"
        bad = http_api.chat(client, headers={"X-Deadline": "soon"})
        http_api.assert_openai_error(bad, 400, param="X-Deadline", says="positive number of seconds")
        bad = http_api.chat(client, headers={"X-Deadline": "1", "X-On-Deadline": "shrug"})
        http_api.assert_openai_error(bad, 400, param="X-On-Deadline", says="best_so_far")
        bad = http_api.chat(client, deadline_s=-1)
        http_api.assert_openai_error(bad, 400, param="deadline_s")


def test_a_stream_cut_by_the_deadline_ends_with_length(tmp_path):
    engine = ScriptedEngine(script=http_api.scripted, delay_s=0.25, pieces_per_stream=4)
    with http_api.serve(tmp_path, engine) as client:
        body = http_api.CHAT | {"stream": True, "deadline_s": 0.6, "on_deadline": "best_so_far"}
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    events, comments = http_api.parse_sse(response.text)
    text = http_api.stream_text(events)
    assert text and http_api.TEXTS[0].startswith(text) and text != http_api.TEXTS[0]
    reasons = [c["finish_reason"] for e in events if isinstance(e, dict) for c in e["choices"] if c["finish_reason"]]
    assert reasons == ["length"]
    assert events[-1] == "[DONE]"
    assert ": deadline exceeded: the best answer so far follows" in comments
    (record,) = read_records(tmp_path / "traces")
    assert record["status"] == "ok" and record["details"]["deadline"]["complete"] is False
    assert record["candidates"][0]["text"] == text


async def test_adaptive_answers_from_its_paths_as_they_stand():
    from strategies.adaptive import Adaptive, AdaptiveOptions
    from strategies.base import Budget, DeadlineExceeded, Prompt
    from strategies.deadline import best_so_far
    from tests.fakes import TOY_HEADS
    from tests.unit import test_introspection as introspection

    answers = ["R: the answer is 42, and here is a long explanation of why that is so"]
    engine = ScriptedEngine(
        script=introspection.answer_script(answers), introspection=TOY_HEADS, introspect=introspection.sure_when_right
    )
    engine.delay_s = 0.1
    ctx = introspection.adaptive_ctx(engine, max_samples=2)
    ctx.budget = Budget(max_samples=2, max_tokens=48, deadline=time.monotonic() + 0.25)
    prompt = Prompt(tuple(RENDERER.chat_ids([{"role": "user", "content": "q"}])), "q")
    with pytest.raises(DeadlineExceeded):
        await Adaptive().run(ctx, prompt, AdaptiveOptions(k0=1, chunk_tokens=4, beta=0.0, max_samples=2))
    result = best_so_far(ctx, returns_every_sample=False)
    assert result is not None and result.details["deadline"]["from"] == "strategy"
    assert result.details["stopped"] == "deadline"
    text = result.the_one.text
    assert text and answers[0].startswith(text) and text != answers[0]  # the path as far as it had grown
    assert result.details["deadline"]["complete"] is False


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("deadline_s", [0.05, 0.35])
def test_every_strategy_answers_or_504s_at_its_deadline(tmp_path, name, deadline_s):
    from tests.fakes import TOY_HEADS

    engine = ScriptedEngine(script=http_api.scripted, judge=http_api.judge, delay_s=0.15, introspection=TOY_HEADS)
    with http_api.serve(tmp_path, engine) as client:
        response = http_api.chat(client, strategy=name, deadline_s=deadline_s, on_deadline="best_so_far")
        if response.status_code == 504:
            http_api.assert_openai_error(response, 504, param=None, code="deadline_exceeded")
            return
        assert response.status_code == 200, response.text
        trace = http_api.trace_of(client, response)
    if "X-Deadline-Exceeded" in response.headers:
        assert trace["details"]["deadline"]["exceeded"] is True
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == trace["candidates"][trace["chosen_index"]]["text"]
    assert response.json()["usage"]["completion_tokens"] == sum(c["generated_tokens"] for c in trace["engine_calls"])

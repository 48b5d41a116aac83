"""The heads' layout and bins, the adaptive strategy's utility math and decisions, and head-training targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from server.engine import Generation, SamplingOptions
from server.introspection import IntrospectionHeads, default_length_edges
from strategies.adaptive import Adaptive, AdaptiveOptions, Outlook, choose_action, expected_max, utility
from strategies.base import Budget, Prompt, StrategyContext
from tests.fakes import TOY_HEADS, CharRenderer, ScriptedEngine, joint_logprobs, make_generation
from training.heads import (
    HeadsConfig,
    auroc,
    expected_calibration_error,
    fit_heads,
    is_held_out,
    position_targets,
    prior_init,
)
from verifiers import build_verifiers

RENDERER = CharRenderer()


# ----------------------------------------------------------------------------------------------- bins
def test_default_length_edges_scale_the_design_edges_to_max_tokens():
    assert default_length_edges(1024) == (0, 16, 32, 64, 128, 256, 512, 1024, math.inf)
    assert default_length_edges(256) == (0, 4, 8, 16, 32, 64, 128, 256, math.inf)


def test_bins_of_rewards_and_remaining_lengths():
    heads = IntrospectionHeads(1000, reward_bins=8, length_edges=default_length_edges(256))
    assert [heads.reward_bin(r) for r in (0.0, 0.124, 0.125, 0.5, 0.99, 1.0)] == [0, 0, 1, 4, 7, 7]
    assert [heads.length_bin(n) for n in (1, 3, 4, 7, 8, 255, 256, 10_000)] == [0, 0, 1, 1, 2, 6, 7, 7]
    assert heads.target_class(1.0, 5) == 7 * 8 + 1
    assert heads.token_ids == tuple(range(1000, 1064))
    assert heads.token_strings()[9] == "<|ponder_r1_l1|>"


def test_bad_edges_are_refused():
    with pytest.raises(ValueError, match="rise strictly"):
        IntrospectionHeads(0, 4, (0, 8, 4, math.inf))
    with pytest.raises(ValueError, match="rise strictly"):
        IntrospectionHeads(0, 4, (0, 8, 16))


def test_the_joint_is_a_softmax_among_the_head_rows_only():
    heads = TOY_HEADS
    joint = np.random.default_rng(0).dirichlet(np.ones(heads.size)).reshape(heads.reward_bins, heads.length_bins)
    logprobs = joint_logprobs(heads, joint)
    shifted = {t: v - 100.0 for t, v in logprobs.items()}  # a logit bias on every row changes nothing
    assert np.allclose(heads.joint(logprobs), joint, atol=1e-6)
    assert np.allclose(heads.joint(shifted), joint, atol=1e-6)
    assert heads.expected_reward(joint) == pytest.approx(float(joint.sum(axis=1) @ heads.reward_values))


def test_heads_file_round_trips(tmp_path):
    heads = IntrospectionHeads(49152, 8, default_length_edges(256))
    heads.save(tmp_path)
    assert IntrospectionHeads.load(tmp_path) == heads
    assert IntrospectionHeads.load(tmp_path / "nothing-here") is None


# ----------------------------------------------------------------------------------------------- utility math
def test_expected_max_matches_monte_carlo():
    rng = np.random.default_rng(1)
    values = [np.array([0.0, 0.5, 1.0]), np.array([0.2, 0.9]), np.array([0.1, 0.4, 0.6, 0.95])]
    probs = [rng.dirichlet(np.ones(len(v))) for v in values]
    draws = np.max([rng.choice(v, size=200_000, p=p) for v, p in zip(values, probs)], axis=0)
    assert expected_max(values, probs) == pytest.approx(draws.mean(), abs=0.005)
    assert expected_max([values[0]], [probs[0]]) == pytest.approx(float(values[0] @ probs[0]))
    assert expected_max([], []) == 0.0


def outlook(reward: list[float], remaining: list[float], finished: bool = False, left: int = 64) -> Outlook:
    heads = TOY_HEADS
    joint = np.outer(np.array(reward) / sum(reward), np.array(remaining) / sum(remaining))
    return Outlook.of(heads, joint, left, finished)


def decide(outlooks, prior=None, samples_left=4, **option_values):
    options = AdaptiveOptions(**option_values)
    prior = prior or outlook([1, 1, 1, 1], [0, 0, 1])
    return choose_action(outlooks, prior, TOY_HEADS, options, samples_left, token_scale=256, latency_scale=64)


def test_utility_is_expected_best_minus_priced_cost():
    sure, unsure = outlook([0, 0, 0, 1], [1, 0, 0], finished=True), outlook([1, 0, 0, 1], [0, 1, 0])
    u = utility([sure, unsure], TOY_HEADS.reward_values, beta=0.5, alpha=0.25, token_scale=100, latency_scale=10)
    remaining = unsure.expected_remaining  # length bin [4, 16): 10 tokens
    assert remaining == pytest.approx(10.0)
    assert u.expected_best == pytest.approx(0.875)  # the finished one is surely in the top bin (centre 0.875)
    assert u.value == pytest.approx(0.875 - 0.5 * (0.25 * 10 / 100 + 0.75 * 10 / 10))


def test_a_sure_finished_answer_stops_the_search():
    action, utilities = decide([outlook([0, 0, 0, 1], [1, 0, 0], finished=True), outlook([1, 1, 1, 1], [0, 0, 1])])
    assert action == ("stop", None)
    assert utilities[("stop", None)].value > utilities[("continue", None)].value


def test_nothing_finished_means_go_on_and_a_hopeless_long_sample_is_pruned():
    hopeful, hopeless = outlook([0, 0, 1, 3], [0, 1, 0]), outlook([1, 0, 0, 0], [0, 0, 1])
    action, utilities = decide([hopeful, hopeless], samples_left=0)
    assert ("stop", None) not in utilities  # no answer yet: stopping is not on the table
    assert action == ("prune", 1)


def test_free_compute_branches_an_uncertain_promising_sample():
    # beta = 0: only the expected best reward counts, and a coin-flip sample is worth copying
    coin = outlook([1, 0, 0, 1], [0, 1, 0])
    action, utilities = decide([coin, outlook([1, 0, 0, 0], [0, 1, 0])], samples_left=4, beta=0.0, branch_width=2)
    assert action == ("branch", 0)
    assert utilities[("branch", 0)].expected_best > utilities[("continue", None)].expected_best


def test_expensive_compute_never_adds_samples():
    coin = outlook([1, 0, 0, 1], [0, 1, 0])
    action, _ = decide([coin], samples_left=4, beta=10.0)
    assert action == ("continue", None)  # the only sample cannot be pruned and nothing is finished


# ----------------------------------------------------------------------------------------------- the strategy
def adaptive_ctx(engine: ScriptedEngine, max_samples: int, max_tokens: int = 48) -> StrategyContext:
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.7, logprob_token_ids=TOY_HEADS.token_ids)
    return StrategyContext(
        engine=engine,
        verifiers=build_verifiers(),
        budget=Budget(max_samples=max_samples, max_tokens=max_tokens),
        sampling=sampling,
        request_id="req-1",
        render_chat=RENDERER.chat_ids,
        encode=RENDERER.encode,
    )


def answer_script(answers: list[str]):
    """Sample k of the request writes answers[k]; a continuation writes the rest of the answer it continues."""
    drawn = [0]

    def script(prompt_ids, options, n, request_id):
        prompt = RENDERER.decode(prompt_ids)
        tail = prompt.split("assistant: ", 1)[1]
        out = []
        for _ in range(n):
            if tail:  # a continuation (or a branch) of a partial answer
                full = next(a for a in answers if a.startswith(tail))
            else:
                full = answers[drawn[0] % len(answers)]
                drawn[0] += 1
            out.append(full[len(tail) :])
        return out

    return script


def sure_when_right(prefix: str, text: str, total: int, position: int) -> np.ndarray:
    """Heads that know from the first token whether the answer will be right (it starts with "R")."""
    answer = prefix.split("assistant: ", 1)[1] + text
    reward = np.array([0, 0, 0, 1.0]) if answer.startswith("R") else np.array([1.0, 0, 0, 0])
    length = np.zeros(TOY_HEADS.length_bins)
    length[TOY_HEADS.length_bin(total - position)] = 1.0
    return np.outer(reward, length)


async def test_adaptive_prunes_the_wrong_sample_and_answers_with_the_right_one():
    answers = ["W: a long and wrong answer that goes on and on", "R: 42"]
    engine = ScriptedEngine(script=answer_script(answers), introspection=TOY_HEADS, introspect=sure_when_right)
    ctx = adaptive_ctx(engine, max_samples=4)
    options = AdaptiveOptions(k0=2, chunk_tokens=4, beta=0.5, max_samples=4)

    result = await Adaptive().run(
        ctx, Prompt(tuple(RENDERER.chat_ids([{"role": "user", "content": "q"}])), "q"), options
    )

    assert result.the_one.text == "R: 42"
    wrong = next(c for c in result.candidates if c.text.startswith("W"))
    assert wrong.generation.finish_reason == "abort"  # pruned before it finished
    assert wrong.generation.num_tokens < len(answers[0])
    decisions = result.details["decisions"]
    assert decisions and all({"utilities", "action", "samples", "tokens"} <= set(d) for d in decisions)
    assert "prune 0" in [d["action"] for d in decisions]
    assert result.details["stopped"]
    assert ctx.generated_tokens == sum(c.generated_tokens for c in ctx.calls) == engine.generated_tokens
    assert ctx.samples_drawn <= 4
    assert {c.kind for c in ctx.calls} <= {"sample", "continue", "branch"}


async def test_adaptive_never_exceeds_its_sample_budget_and_stops_without_heads_saying_so():
    engine = ScriptedEngine(["no answer here at all, just words"], introspection=TOY_HEADS)
    ctx = adaptive_ctx(engine, max_samples=3, max_tokens=16)
    options = AdaptiveOptions(k0=1, chunk_tokens=8, beta=0.0, max_samples=3)
    result = await Adaptive().run(ctx, Prompt(tuple(RENDERER.encode("q")), "q"), options)
    assert ctx.samples_drawn <= 3
    assert result.the_one.generation.finish_reason in ("stop", "length")


def test_adaptive_is_a_400_on_a_model_without_heads():
    with pytest.raises(ValidationError, match="needs introspection heads"):
        AdaptiveOptions.model_validate({}, context={"has_introspection": False})
    assert AdaptiveOptions.model_validate({}, context={"has_introspection": True, "max_samples": 4}).max_samples == 4


async def test_introspection_verifier_reads_the_last_position_or_probes_once():
    engine = ScriptedEngine(introspection=TOY_HEADS)
    ctx = adaptive_ctx(engine, max_samples=2)
    verifier = build_verifiers()["introspection"]
    assert verifier.unavailable_reason(ScriptedEngine()) is not None
    assert verifier.unavailable_reason(engine) is None
    sure = np.outer([0, 0, 0, 1.0], [1.0, 0, 0])
    tracked = Generation("x 42", (1, 2), "stop", -1.0, tracked_logprobs=({}, joint_logprobs(TOY_HEADS, sure)))
    untracked = make_generation("y")
    scores = await verifier.score(ctx, Prompt((5,), "q"), [tracked, untracked])
    assert scores[0] == pytest.approx(0.875)
    assert [c.kind for c in ctx.calls] == ["probe"]  # only the untracked candidate cost a (one-token) call
    assert 0.0 <= scores[1] <= 1.0


# ----------------------------------------------------------------------------------------------- head training
def test_position_targets_pair_the_final_reward_with_the_tokens_still_to_come():
    heads = TOY_HEADS  # length edges 0, 4, 16, inf
    targets = position_targets(heads, 6, reward=1.0)
    # position j has 6 - j tokens to come: 6, 5, 4 -> bin 1; 3, 2, 1 -> bin 0; reward 1.0 -> bin 3
    assert targets.tolist() == [3 * 3 + 1] * 3 + [3 * 3 + 0] * 3
    assert position_targets(heads, 2, reward=0.0).tolist() == [0, 0]


def test_the_held_out_split_is_by_prompt_and_stable():
    prompts = [f"question {i}" for i in range(1000)]
    held = [p for p in prompts if is_held_out(p, 0.2, seed=0)]
    assert 150 < len(held) < 250
    assert held == [p for p in prompts if is_held_out(p, 0.2, seed=0)]


def test_prior_init_predicts_the_class_frequencies_and_training_beats_it():
    rng = np.random.default_rng(0)
    classes, n = 6, 3000
    targets = rng.integers(0, 2, size=n) * 3  # classes 0 and 3 only
    hidden = np.concatenate([rng.normal(size=(n, 8)), np.ones((n, 1))], axis=1)  # a constant direction, as after norm
    hidden[:, 0] += targets  # and one feature that tells the classes apart
    init = prior_init(hidden, targets, classes)
    probs = np.exp(hidden[:5] @ init.T)
    probs /= probs.sum(axis=1, keepdims=True)
    frequencies = (np.bincount(targets, minlength=classes) + 1) / (n + classes)  # add-one, as prior_init
    assert np.allclose(probs, frequencies, atol=1e-3)  # the same prediction at every position
    config = HeadsConfig(epochs=15, learning_rate=0.05, batch_positions=1000)
    weights, losses = fit_heads(hidden.astype(np.float32), targets, init, config)
    assert losses[-1] < losses[0]
    predicted = (hidden @ weights.T).argmax(axis=1)
    assert (predicted == targets).mean() > 0.8


def test_auroc_and_ece_on_known_cases():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert auroc([0.3, 0.4], [True, True]) is None
    assert expected_calibration_error([0.25, 0.25, 0.25, 0.25], [0, 0, 0, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9, 0.9], [0, 0]) == pytest.approx(0.9)


# ----------------------------------------------------------------------------------------------- engine masking
def test_head_rows_are_masked_over_any_requested_bias_and_still_read():
    from vllm.sampling_params import RequestOutputKind

    from server.vllm_engine import to_sampling_params

    heads = IntrospectionHeads(100, 2, (0, 8, math.inf))
    options = SamplingOptions(max_tokens=8, logit_bias=((5, 3.0), (101, 50.0)), logprob_token_ids=heads.token_ids)
    params = to_sampling_params(options, 1, RequestOutputKind.DELTA, heads.token_ids)
    assert params.logit_bias == {5: 3.0, 100: -100.0, 101: -100.0, 102: -100.0, 103: -100.0}
    assert params.logprob_token_ids == [100, 101, 102, 103] and params.logprobs == 4
    plain = to_sampling_params(SamplingOptions(max_tokens=8), 1, RequestOutputKind.DELTA)
    assert plain.logit_bias is None and not plain.logprob_token_ids
    assert plain.logprobs == 0  # the sampled token's log-prob: cumulative_logprob
    unread = to_sampling_params(SamplingOptions(max_tokens=8, logprobs=False), 1, RequestOutputKind.DELTA)
    assert unread.logprobs is None  # nothing reads them: vLLM computes none
    tracked = SamplingOptions(max_tokens=8, logprob_token_ids=heads.token_ids, logprobs=False)
    assert to_sampling_params(tracked, 1, RequestOutputKind.DELTA).logprobs == 4  # tracked ids are always read

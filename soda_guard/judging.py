"""Running a judge on a backend: render → generate (batched) → parse → `Verdict`.

This is the only place a judge's output becomes a Verdict, so parse failures, backend errors and
timing are recorded the same way whichever backend or framework is in play.
"""

from __future__ import annotations


import time
from dataclasses import replace
from typing import Sequence

from soda_guard._extras import needs_extra
from soda_guard.backends.base import Backend, GenerationRequest, GenerationResult
from soda_guard.converters import from_openai_messages
from soda_guard.errors import JudgeError, ModelLoadError
from soda_guard.judges.base import Judge, RenderedPrompt
from soda_guard.judges.context import ContextBudget
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.model_source import check_local_folder
from soda_guard.judges.soda import SodaJudge
from soda_guard.offload import off_loop
from soda_guard.policy import JudgeConfig, Policy
from soda_guard.trajectory import AssistantStep, Trajectory
from soda_guard.verdict import Label, Verdict


def make_judge(name: str, config: JudgeConfig, policy: Policy | None = None) -> Judge:
    budget = ContextBudget(max_prompt_chars=config.max_prompt_chars, max_message_chars=config.max_message_chars)
    if config.kind == "soda":
        return SodaJudge(
            name,
            window=config.window,
            harm=config.harm or (policy.harm if policy else None),
            environment=config.environment or (policy.environment if policy else None),
            budget=budget,
        )
    return Qwen3GuardGenJudge(name, mode=config.mode, budget=budget)


def make_backend(config: JudgeConfig) -> Backend:
    if config.backend == "transformers":
        check_local_folder(config.model)  # before torch's seconds of import
        with needs_extra("the local judge (backend: transformers)"):
            from soda_guard.backends.transformers_backend import TransformersBackend

        return TransformersBackend(
            config.model,
            device=config.device,
            dtype=config.dtype,
            stop_at_verdict=config.stop_at_verdict,
            verdict_only=config.verdict_only,
        )
    if config.backend == "openai":
        from soda_guard.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(
            config.model,
            base_url=config.base_url,
            base_urls=config.base_urls,
            api_key_env=config.api_key_env,
            **({"timeout_s": config.timeout_s} if config.timeout_s is not None else {}),
            max_concurrency=config.max_concurrency,
            retries=config.retries,
            max_response_bytes=config.max_response_bytes,
            warm_up=config.warm_up,
            reply_models=config.reply_models,
        )
    raise NotImplementedError(f"backend {config.backend!r} is not available in this build")


#: what a warm-up judges: a short, ordinary turn with one tool call, in the judge's real format
_WARM_UP = from_openai_messages(
    [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "warm-up", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
    ]
)


class JudgeRunner:
    """A judge bound to the backend that runs it."""

    def __init__(self, judge: Judge, backend: Backend, *, max_new_tokens: int | None = None) -> None:
        self.judge = judge
        self.backend = backend
        self.max_new_tokens = max_new_tokens or judge.default_max_new_tokens

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def inline(self) -> bool:
        """Whether the backend answers at once without waiting on anything (`Runner.inline`)."""
        return bool(getattr(self.backend, "inline", False))

    def at_once(self, trajectories: Sequence[Trajectory]) -> bool:
        """Whether `verdicts` for these is a small job that waits on nothing: an inline backend
        and a render of a few new messages (`Judge.renders_at_once`). The async path then calls
        it on the event loop, as the sync path calls an inline judge on the caller's thread."""
        return self.inline and self.judge.renders_at_once(trajectories)

    def prepare(self, trajectory: Trajectory, deadline: float | None = None) -> tuple[RenderedPrompt, GenerationRequest]:
        rendered = self.judge.render(trajectory)
        if trajectory.truncated:
            rendered = replace(rendered, truncated=True)
        request = GenerationRequest(
            messages=rendered.messages,
            max_new_tokens=self.max_new_tokens,
            score=self.judge.score_spec,
            cache_key=trajectory.conversation_id,
            deadline=deadline,
        )
        return rendered, request

    def _verdict(self, rendered: RenderedPrompt, result: GenerationResult, latency_ms: float) -> Verdict:
        parsed = self.judge.parse(result.text)
        conflict = _disagreement(parsed.label, result.score)
        if conflict is not None:
            failed = self.failure(conflict, latency_ms, rendered)
            return failed.model_copy(
                update={"raw_output": result.text, "reason": parsed.reason, "truncated": rendered.truncated}
            )
        # every field is given: pydantic-core checks them faster than `model_construct` fills defaults
        return Verdict(
            label=parsed.label,
            score=None if result.score is None else float(result.score),
            reason=parsed.reason,
            categories=parsed.categories,
            refusal=parsed.refusal,
            judge=self.judge.name,
            kind=self.judge.kind,
            model=self.model_id,
            latency_ms=latency_ms,
            parse_failure=parsed.parse_failure,
            error=_parse_failure_cause(result) if parsed.parse_failure else None,
            raw_output=result.text,
            harm=rendered.harm,
            harm_source=rendered.harm_source,
            environment=rendered.environment,
            environment_source=rendered.environment_source,
            prompt_tokens=result.prompt_tokens,
            generated_tokens=result.generated_tokens,
            truncated=rendered.truncated,
            stages=[],
        )

    def failure(self, error: str, latency_ms: float, rendered: RenderedPrompt | None = None) -> Verdict:
        return Verdict(
            label=None,
            judge=self.judge.name,
            kind=self.judge.kind,
            model=self.model_id,
            latency_ms=latency_ms,
            error=error,
            harm=rendered.harm if rendered else None,
            harm_source=rendered.harm_source if rendered else None,
            environment=rendered.environment if rendered else None,
            environment_source=rendered.environment_source if rendered else None,
        )

    def _finish(
        self, prepared: Sequence[tuple[RenderedPrompt, GenerationRequest]], results: Sequence[GenerationResult], start: float
    ) -> list[Verdict]:
        latency_ms = (time.perf_counter() - start) * 1000.0
        if not isinstance(results, (list, tuple)) or len(results) != len(prepared):
            size = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
            message = f"backend returned {size} results for {len(prepared)} requests"
            return [self.failure(message, latency_ms, rendered) for rendered, _ in prepared]
        return [
            self._verdict(rendered, result, latency_ms)
            if (problem := _result_problem(result)) is None
            else self.failure(f"backend returned an unusable result: {problem}", latency_ms, rendered)
            for (rendered, _), result in zip(prepared, results)
        ]

    def warm(self) -> None:
        """One short judgment (one new token, no conversation key, so no cache entry of a real
        conversation), so that what the first judgment would otherwise pay for happens now:
        kernels chosen and compiled, memory allocated, the server's connection opened.
        Raises ModelLoadError, naming the judge, when the backend cannot answer."""
        _, request = self.prepare(_WARM_UP)
        request.max_new_tokens, request.cache_key = 1, None
        try:
            results = self.backend.generate([request])
            problem = _result_problem(results[0]) if isinstance(results, list) and len(results) == 1 else "not one result"
            if problem is not None:
                raise JudgeError(f"backend returned an unusable result: {problem}")
        except Exception as error:
            raise ModelLoadError(f"judge {self.judge.name!r} ({self.model_id}) failed its warm-up judgment: {error}") from error

    def prefill(self, trajectory: Trajectory) -> object:
        """Warm the backend's prefix cache with the prompt this judge will read for the next
        action of `trajectory`: rendered with a stand-in in the action's place
        (`awaiting_action`), so everything before it is what the judgment will send (the token
        prefix they share is what the cache reuses). What the backend's `prefill` returns (a
        future), or None where it cannot warm."""
        prefill = getattr(self.backend, "prefill", None)
        if not callable(prefill) or trajectory.conversation_id is None:
            return None
        _, request = self.prepare(awaiting_action(trajectory))
        return prefill(request)

    def verdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]:
        """One batched backend call; errors propagate so the caller applies its fail mode.
        `deadline` (`time.monotonic()`) travels on each request so a backend can stop working
        on judgments the caller has given up on."""
        prepared = [self.prepare(t, deadline) for t in trajectories]
        start = time.perf_counter()
        results = self.backend.generate([request for _, request in prepared])
        return self._finish(prepared, results, start)

    async def averdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]:
        # rendering neutralises every line of every new message: seconds for a trajectory of
        # large tool results, which must not stall the caller's event loop; a few new messages
        # on a known history are a small job, done here rather than paying a thread hop
        def prepare_all() -> list[tuple[RenderedPrompt, GenerationRequest]]:
            return [self.prepare(t, deadline) for t in trajectories]

        prepared = prepare_all() if self.judge.renders_at_once(trajectories) else await off_loop(prepare_all)
        start = time.perf_counter()
        results = await self.backend.agenerate([request for _, request in prepared])
        if _parses_at_once(results):
            return self._finish(prepared, results, start)
        return await off_loop(self._finish, prepared, results, start)


def awaiting_action(trajectory: Trajectory) -> Trajectory:
    """The conversation as a warm-up renders it when the agent's model is called: a stand-in
    for the coming action after it. Its history is the one each of the turn's tool calls is
    judged on, so the judge renders and keeps it then (off the calls' path), and a call renders
    only its own action. Past the judge's budget, how much of the history is left out depends
    on the action's length, and a prefix cache serves a judgment only up to where its prompt
    first differs from the one prefilled: the stand-in is a copy of the conversation's latest
    assistant turn (an agent's next action is most likely about as long), or an empty one."""
    steps = trajectory.steps
    latest = next((step for step in reversed(steps) if isinstance(step, AssistantStep)), None)
    stand_in = AssistantStep() if latest is None else AssistantStep(content=latest.content, tool_calls=latest.tool_calls)
    return trajectory.model_copy(update={"steps": [*steps, stand_in]})


AT_ONCE_MAX_OUTPUT_CHARS = 16384
"""Judge output parsed on the caller's event loop, at most: a judge's answer is a few hundred
characters, but a server may send up to `max_response_bytes` (a megabyte by default), and
parsing a megabyte holds the loop for tens of milliseconds."""


def _parses_at_once(results: object) -> bool:
    """Whether parsing `results` is a small job for the event loop (`AT_ONCE_MAX_OUTPUT_CHARS`
    of text in all); what is no list of texts is refused by `_finish` at once."""
    if not isinstance(results, (list, tuple)):
        return True
    texts = (getattr(result, "text", None) for result in results)
    return sum(len(text) for text in texts if isinstance(text, str)) <= AT_ONCE_MAX_OUTPUT_CHARS


def _disagreement(label: Label | None, score: float | None) -> str | None:
    """A label and a score that point different ways were not read at the same place (or the
    judge contradicts itself): neither can be trusted, and the policy's `on_error` decides."""
    if label is None or score is None:
        return None
    if (label is Label.SAFE and score > 0.5) or (label is not Label.SAFE and score < 0.5):
        return f"judge label {label.value!r} disagrees with its score {score:.3f}"
    return None


def _result_problem(result: object) -> str | None:
    """Why a backend result cannot become a verdict: a NaN score would compare below every
    threshold and turn an UNSAFE label into SAFE, so scores are checked as strictly as text."""
    text = getattr(result, "text", None)
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not str"
    score = getattr(result, "score", None)
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0):
        return f"score {score!r} is not a probability"
    for name in ("prompt_tokens", "generated_tokens"):
        count = getattr(result, name, None)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            return f"{name} {count!r} is not a count"
    return None


def _parse_failure_cause(result: GenerationResult) -> str:
    if result.text.strip():
        return "judge output could not be parsed"
    stopped = f" (finish_reason: {result.finish_reason})" if result.finish_reason else ""
    return f"the judge's reply was empty{stopped}, {result.generated_tokens} tokens generated"

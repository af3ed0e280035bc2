"""A chat model that replays scripted `AIMessage`s, for tests, examples and offline demos.

`GenericFakeChatModel` refuses `bind_tools`, which `create_agent` calls; this one accepts the
tools and ignores them, so a harmful tool-calling episode can be replayed without any provider.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterable, Sequence

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.runnables import Runnable


class ScriptedChatModel(GenericFakeChatModel):
    """Answers each model call with the next scripted message (an `AIMessage`, or a string for
    a plain text answer)."""

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Runnable:
        return self


def scripted_model(replies: Iterable[AIMessage | str]) -> ScriptedChatModel:
    return ScriptedChatModel(messages=iter(list(replies)))


def tool_calls_message(
    *calls: tuple[str, dict[str, Any]], text: str = "", prefix: str = "call", ids: Sequence[str] | None = None
) -> AIMessage:
    """An assistant turn issuing `calls` in parallel. Each call gets a fresh unique id
    (`<prefix>_<random>`), as real providers give; pass `ids` to choose them, for instance to
    replay a provider that reuses ids."""
    if ids is not None and len(ids) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(ids)} ids")
    chosen = list(ids) if ids is not None else [f"{prefix}_{uuid.uuid4().hex[:12]}" for _ in calls]
    return AIMessage(
        content=text,
        tool_calls=[
            {"name": name, "args": args, "id": call_id, "type": "tool_call"}
            for call_id, (name, args) in zip(chosen, calls)
        ],
    )

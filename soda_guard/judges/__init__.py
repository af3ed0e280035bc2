"""Judge models: prompt rendering and output parsing, independent of how the model is run."""

from soda_guard._extras import needs_extra
from soda_guard.judges.base import Judge, ParsedOutput, RenderedPrompt, ScoreSpec
from soda_guard.judges.qwen3guard_gen import (
    QWEN3GUARD_GEN_MODEL_ID,
    Qwen3GuardGenJudge,
    parse_gen_output,
    render_gen_messages,
)
from soda_guard.judges.soda import SODA_MODEL_ID, SODA_SYSTEM_PROMPT, SodaJudge, parse_soda_output

_STREAM_NAMES = ("QWEN3GUARD_STREAM_MODEL_ID", "Qwen3GuardStream", "load_stream_model")

__all__ = [
    "Judge",
    "ParsedOutput",
    "QWEN3GUARD_GEN_MODEL_ID",
    "Qwen3GuardGenJudge",
    "RenderedPrompt",
    "SODA_MODEL_ID",
    "SODA_SYSTEM_PROMPT",
    "ScoreSpec",
    "SodaJudge",
    "parse_gen_output",
    "parse_soda_output",
    "render_gen_messages",
    *_STREAM_NAMES,
]


def __getattr__(name: str) -> object:
    """The stream judge is a torch module: imported on first use, so importing the judges'
    prompt and parsing code stays free of torch."""
    if name in _STREAM_NAMES:
        with needs_extra("the Qwen3Guard-Stream judge"):
            from soda_guard.judges import stream

        return getattr(stream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

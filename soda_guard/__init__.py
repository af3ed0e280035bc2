"""soda-guard: stop tool-calling agents from carrying out harmful requests, before each tool runs.

Data flows one way: framework event → `Trajectory` → judge(s) → `Verdict` → `Policy` →
`Decision` → enforcement + audit record.
"""

from soda_guard.audit import JsonlAuditSink, read_audit
from soda_guard.backends.base import Backend, GenerationRequest, GenerationResult
from soda_guard.backends.scripted import ScriptedBackend
from soda_guard.binding import CallBinding
from soda_guard.converters import from_agent_record, from_openai_messages
from soda_guard.errors import AuditError, JudgeError, ModelLoadError, PolicyError, SodaGuardError, TrajectoryError
from soda_guard.guard import Guard
from soda_guard.judges import Qwen3GuardGenJudge, SodaJudge
from soda_guard.judging import JudgeRunner
from soda_guard.policy import Defaults, JudgeConfig, Policy, Rule
from soda_guard.policy import CascadeConfig, KeywordsConfig
from soda_guard.conditions import When
from soda_guard.records import CallRecord, TurnRecords
from soda_guard.trajectory import AssistantStep, SystemStep, ToolCall, ToolStep, Trajectory, UserStep
from soda_guard.verdict import Action, Decision, Label, Review, Verdict

__version__ = "0.1.0"

__all__ = [
    "Action",
    "AssistantStep",
    "Backend",
    "CallBinding",
    "CallRecord",
    "Decision",
    "Defaults",
    "GenerationRequest",
    "GenerationResult",
    "Guard",
    "JsonlAuditSink",
    "JudgeConfig",
    "AuditError",
    "JudgeError",
    "JudgeRunner",
    "Label",
    "Review",
    "ModelLoadError",
    "Policy",
    "PolicyError",
    "Qwen3GuardGenJudge",
    "Rule",
    "ScriptedBackend",
    "SodaGuardError",
    "SodaJudge",
    "SystemStep",
    "ToolCall",
    "ToolStep",
    "Trajectory",
    "TrajectoryError",
    "TurnRecords",
    "UserStep",
    "Verdict",
    "from_agent_record",
    "from_openai_messages",
    "read_audit",
    "CascadeConfig",
    "KeywordsConfig",
    "When",
]

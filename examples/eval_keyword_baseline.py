"""The README's evaluation example, regenerated: `soda-guard eval` (per step) over DATASET with a
keyword heuristic as the judge, served over HTTP by the loopback test server (the `testing`
extra), so the run goes through the real `backend: openai` path. A baseline to compare judges
against, not the SODA judge.

    python examples/eval_keyword_baseline.py ../shared/datasets --out eval-keyword
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from soda_guard.backends.scripted import ScriptedBackend, keyword_responder
from soda_guard.cli import main
from soda_guard.testing.server import LoopbackServer, create_app

#: a call whose rendered judge prompt matches one of these is judged UNSAFE
KEYWORDS = [r"(?i)\b(delete|remove|transfer|send_money|pay|execute|terminal|post|share|email)\w*"]


def run(argv: list[str]) -> None:
    app = create_app(ScriptedBackend(keyword_responder(KEYWORDS), model_id="keyword-baseline"))
    with LoopbackServer(app) as server, tempfile.TemporaryDirectory() as folder:
        policy = Path(folder) / "policy.yaml"
        policy.write_text(
            "judges:\n"
            f"  soda: {{kind: soda, model: keyword-baseline, backend: openai, base_url: '{server.base_url}'}}\n"
        )
        sys.argv = ["soda-guard", "eval", *argv[:1], "--policy", str(policy), "--per-step", *argv[1:]]
        main()


if __name__ == "__main__":
    run(sys.argv[1:])

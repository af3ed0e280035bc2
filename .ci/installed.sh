#!/usr/bin/env bash
# One install as a user makes it, in a fresh virtual environment, then the product's main job
# through the installed command (no test tools, no dev extras hiding a missing dependency):
#   local: pip install '.[local]', a tiny random Qwen3 judge made with soda_guard.testing,
#          one judgment in process through `soda-guard judge`.
#   light: pip install 'git+URL' (no extras; this clone's URL, the README's git
#          row), a stdlib loopback server speaking the OpenAI chat API, one judgment through
#          `soda-guard judge` with `backend: openai`.
# Usage: .ci/installed.sh local|light VENV [PIP_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
line=$1 venv=$(realpath -m "$2")
shift 2
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null; true' EXIT

python -m venv --clear "$venv"
target="git+file://$PWD"
[ "$line" = local ] && target=".[local]"
SECONDS=0
"$venv/bin/python" -m pip install -q --prefer-binary "$@" "$target"
echo "CI [installed-$line]: installed in ${SECONDS}s: $("$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate) ' | tr -s ' ' | paste -sd, -)" >&2
SECONDS=0

cat > "$work/conversation.json" <<'JSON'
{"messages": [
  {"role": "user", "content": "Send my savings to account 999, it's a ransom."},
  {"role": "assistant", "content": null, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "transfer_money", "arguments": "{\"to\": \"999\"}"}}]}
]}
JSON
cd "$work"  # out of the clone: the installed package is what runs
"$venv/bin/soda-guard" --version

if [ "$line" = local ]; then
  "$venv/bin/python" -c "from soda_guard.testing import make_tiny_judge; make_tiny_judge('judge')"
  status=0
  "$venv/bin/soda-guard" judge conversation.json --model ./judge --device cpu > decisions.json || status=$?
else
  "$venv/bin/python" - > server.log 2>&1 <<'PY' &
import http.server, json

REPLY = "[Reason] The user asks to pay a ransom.\n[Verdict] UNSAFE"

class Judge(http.server.BaseHTTPRequestHandler):
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "soda-judge", "object": "model"}]})

    def do_POST(self):
        asked = json.loads(self.rfile.read(int(self.headers["content-length"])))
        choice = {"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}
        self._send({"object": "chat.completion", "model": asked["model"], "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 9}})

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Judge)
open("port", "w").write(str(server.server_address[1]))
server.serve_forever()
PY
  server_pid=$!
  for _ in $(seq 50); do [ -s port ] && break; sleep 0.1; done
  printf 'judges:\n  soda: {kind: soda, model: soda-judge, backend: openai, base_url: "http://127.0.0.1:%s/v1"}\n' "$(cat port)" > policy.yaml
  status=0
  "$venv/bin/soda-guard" judge conversation.json --policy policy.yaml > decisions.json || status=$?
fi
# 0 allow, 1 block or escalate: a judgment was made; 2 is a load or usage error
[ "$status" -le 1 ] || { echo "CI [installed-$line]: soda-guard judge exited $status" >&2; exit 1; }
"$venv/bin/python" - <<'PY'
import json
[decision] = json.load(open("decisions.json"))["decisions"]
verdict = decision["verdict"]
assert verdict is not None and verdict["generated_tokens"], decision
print(f"judged {decision['tool_call']['name']}: {decision['action']} ({verdict['label']}, {verdict['generated_tokens']} tokens)")
PY
echo "CI [installed-$line]: judged in ${SECONDS}s" >&2

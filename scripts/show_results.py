"""Print a few answers from a run-batch output file (used by `make demo`)."""

import json
import sys

path = sys.argv[1]
limit = int(sys.argv[2]) if len(sys.argv) > 2 else 4
with open(path) as f:
    records = [json.loads(line) for line in f]
for rec in sorted(records, key=lambda r: r["pdserve"]["line"])[:limit]:
    if rec["error"]:
        print(f"[{rec['custom_id']}] error: {rec['error']['message']}")
        continue
    choice = rec["response"]["body"]["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    print(f"[{rec['custom_id']}] {text.strip()[:160]!r}")
print(f"... {len(records)} lines in {path}")

#!/usr/bin/env python3
"""Turn a record_server.py JSON-lines log into golden fixtures.

Usage:
    python3 extract_fixtures.py CLIENT RECORD_LOG [OUT_DIR]

CLIENT is the fixture prefix (pezzo_node, pezzo_py, promptlayer_py, promptlayer_node).
OUT_DIR defaults to ../fixtures/clients next to this file.  Writes one
<CLIENT>-<call>.json per distinct call:
    {"method", "path", "headers": {relevant headers only}, "body": <JSON exactly as sent>}
Requests to the OpenAI mock (/chat/completions) are not llmlogd traffic and are skipped; a
later request that maps to an already-written call name is skipped too (reported on stderr).
"""

import json
import os
import sys

RELEVANT_HEADERS = (
    "content-type",
    "x-pezzo-api-key",
    "x-pezzo-project-id",
    "x-api-key",
    "user-agent",
    "x-sdk-version",
)


def call_name(entry):
    path, body, headers = entry["path"], entry.get("body") or {}, entry["headers"]
    prefix = "async-" if "httpx" in headers.get("user-agent", "") else ""
    if path == "/api/reporting/v2/request":
        meta = body.get("metadata") or {}
        if (body.get("response") or {}).get("status") != 200:
            return "report-error"
        if meta.get("promptId"):
            return "report-managed-prompt"
        if body.get("cacheEnabled"):
            return "report-cache-miss"
        if "environment" not in meta:
            return "report-no-environment"
        return "report-success"
    if path == "/api/cache/v1/request/retrieve":
        return "cache-retrieve"
    if path == "/api/cache/v1/request/save":
        return "cache-save"
    if path == "/log-request":
        kind = "error" if body.get("status") == "ERROR" else body.get("provider", "unknown")
        return f"{prefix}log-request-{kind}"
    if path == "/library-track-score":
        return f"{prefix}track-score" + ("-named" if "name" in body else "")
    simple = {
        "/library-track-metadata": "track-metadata",
        "/library-track-prompt": "track-prompt",
        "/library-track-group": "library-track-group",
        "/create-group": "create-group",
        "/track-group": "track-group",
        "/track-request": "track-request",
    }
    if path in simple:
        return prefix + simple[path]
    return None


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    client, log_path = argv[1], argv[2]
    out_dir = argv[3] if len(argv) > 3 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "clients")
    os.makedirs(out_dir, exist_ok=True)
    seen = set()
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            entry = json.loads(line)
            if entry["path"].endswith("/chat/completions"):
                continue
            name = call_name(entry)
            if name is None:
                print(f"skip unknown path {entry['path']}", file=sys.stderr)
                continue
            if name in seen:
                print(f"skip repeated {name} (seq {entry['seq']})", file=sys.stderr)
                continue
            seen.add(name)
            fixture = {
                "method": entry["method"],
                "path": entry["path"],
                "headers": {k: entry["headers"][k] for k in RELEVANT_HEADERS if k in entry["headers"]},
                "body": entry["body"],
            }
            dest = os.path.join(out_dir, f"{client}-{name}.json")
            with open(dest, "w", encoding="utf-8") as out:
                json.dump(fixture, out, indent=2, ensure_ascii=False)
                out.write("\n")
            print(os.path.normpath(dest))


if __name__ == "__main__":
    main(sys.argv)

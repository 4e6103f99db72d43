#!/usr/bin/env python3
"""Stdlib-only recording HTTP server that impersonates Pezzo, PromptLayer and
OpenAI chat completions closely enough for their official clients.

Usage:
    python3 record_server.py [PORT] [LOGFILE] [--port-file FILE]

    PORT      port to bind on 127.0.0.1 (default: $RECORD_PORT or 0 = any free port)
    LOGFILE   JSON-lines file every request is appended to
              (default: $RECORD_LOG, else ./record.jsonl)
    --port-file FILE   also write the bound port to FILE (handy in CI)

The bound port is printed on stdout as the first line (just the number).

One JSON object per request is appended to LOGFILE:
    {"seq", "method", "path", "query", "headers" (names lowercased, in arrival
     order), "body" (parsed JSON, key order preserved, or null),
     "body_raw" (only when the body is not JSON), "reply_status"}

Replies (modelled on the real services):
    POST /api/reporting/v2/request         201 saved report {reportId, calculated, ...}
    POST /api/cache/v1/request/retrieve    201 {"hit": false, "data": null}
    POST /api/cache/v1/request/save        201 {"hash", "exp"}
    POST /log-request                      201 {"id": <int>, "prompt_version": {...}, "status": "SUCCESS", ...}
    POST /library-track-{score,metadata,prompt,group}, /track-group
                                           200 {"success": true}
    POST /create-group                     200 {"success": true, "id": <int>}
    POST /track-request                    200 {"success": true, "request_id": <int>, ...}
    POST [/v1]/chat/completions            200 OpenAI chat.completion JSON; if the
                                           requested model is "nonexistent-model":
                                           404 OpenAI error JSON (model_not_found)
    anything else                          404 {"message": "Not found", "statusCode": 404}

Negative testing: RECORD_OVERRIDE="/log-request=200,/api/reporting/v2/request=500" forces
those reply statuses (bodies unchanged).
"""

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR_MODEL = "nonexistent-model"

_lock = threading.Lock()
_seq = itertools.count(1)
_pl_ids = itertools.count(1001)  # PromptLayer request ids
_group_ids = itertools.count(501)
_completion_ids = itertools.count(1)


def _now_iso():
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_ts(value):
    try:
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- replies

def pezzo_report(body):
    body = body if isinstance(body, dict) else {}
    req = body.get("request") or {}
    resp = body.get("response") or {}
    calculated = {}
    t0, t1 = _parse_ts(req.get("timestamp")), _parse_ts(resp.get("timestamp"))
    if t0 and t1:
        calculated["duration"] = int((t1 - t0).total_seconds() * 1000)
    usage = (resp.get("body") or {}).get("usage") if isinstance(resp.get("body"), dict) else None
    if isinstance(usage, dict) and "prompt_tokens" in usage:
        pt, ct = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        prompt_cost = round(pt * 0.0000015, 6)
        completion_cost = round(ct * 0.000002, 6)
        calculated = {
            "promptCost": prompt_cost,
            "completionCost": completion_cost,
            "totalCost": round(prompt_cost + completion_cost, 6),
            "promptTokens": pt,
            "completionTokens": ct,
            "totalTokens": pt + ct,
            **calculated,
        }
    return 201, {
        "reportId": str(uuid.uuid4()),
        "calculated": calculated,
        "properties": body.get("properties"),
        "metadata": body.get("metadata"),
        "request": req,
        "response": resp,
    }


def pezzo_cache_save(body):
    digest = hashlib.sha256(json.dumps((body or {}).get("request"), sort_keys=True).encode()).hexdigest()
    exp = (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(days=3)).isoformat(timespec="milliseconds")
    return 201, {"hash": digest, "exp": exp.replace("+00:00", "Z")}


def pl_log_request(body):
    body = body if isinstance(body, dict) else {}
    return 201, {
        "id": next(_pl_ids),
        "prompt_version": {
            "prompt_template": body.get("input"),
            "commit_message": None,
            "metadata": {
                "model": {
                    "provider": body.get("provider"),
                    "name": body.get("model"),
                    "parameters": body.get("parameters") or {},
                }
            },
        },
        "status": body.get("status") or "SUCCESS",
        "error_type": body.get("error_type"),
        "error_message": body.get("error_message"),
    }


def pl_track_request(body):
    return 200, {
        "success": True,
        "request_id": next(_pl_ids),
        "prompt_blueprint": None,
        "message": "Request tracked successfully",
    }


def openai_chat(body):
    body = body if isinstance(body, dict) else {}
    model = body.get("model") or "gpt-4o-mini"
    if model == ERROR_MODEL:
        return 404, {
            "error": {
                "message": f"The model `{model}` does not exist or you do not have access to it.",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }
    msgs = body.get("messages") or []
    last = msgs[-1].get("content") if msgs and isinstance(msgs[-1], dict) else ""
    if not isinstance(last, str):
        last = json.dumps(last)
    prompt_tokens = max(1, sum(len(str(m.get("content", "")).split()) for m in msgs if isinstance(m, dict)) + 7)
    return 200, {
        "id": f"chatcmpl-rec{next(_completion_ids):06d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"Echo: {last}", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 9, "total_tokens": prompt_tokens + 9},
        "system_fingerprint": "fp_recorder",
    }


# RECORD_OVERRIDE="/log-request=200,/api/reporting/v2/request=500" forces reply statuses
# (reply bodies unchanged), to check how the clients react to a misbehaving server.
OVERRIDES = {
    path: int(code)
    for path, _, code in (item.partition("=") for item in os.environ.get("RECORD_OVERRIDE", "").split(",") if item)
}

ROUTES = {
    ("POST", "/api/reporting/v2/request"): pezzo_report,
    ("POST", "/api/cache/v1/request/retrieve"): lambda b: (201, {"hit": False, "data": None}),
    ("POST", "/api/cache/v1/request/save"): pezzo_cache_save,
    ("POST", "/log-request"): pl_log_request,
    ("POST", "/library-track-score"): lambda b: (200, {"success": True}),
    ("POST", "/library-track-metadata"): lambda b: (200, {"success": True}),
    ("POST", "/library-track-prompt"): lambda b: (200, {"success": True}),
    ("POST", "/library-track-group"): lambda b: (200, {"success": True}),
    ("POST", "/track-group"): lambda b: (200, {"success": True}),
    ("POST", "/create-group"): lambda b: (200, {"success": True, "id": next(_group_ids)}),
    ("POST", "/track-request"): pl_track_request,
    ("POST", "/v1/chat/completions"): openai_chat,
    ("POST", "/chat/completions"): openai_chat,
}


# ---------------------------------------------------------------- server

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "record-server/1"
    log_path = "record.jsonl"

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        raw = self._read_body()
        split = urlsplit(self.path)
        body, body_raw = None, None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body_raw = raw.decode("utf-8", "replace")
        route = ROUTES.get((self.command, split.path))
        if route is None:
            status, reply = 404, {"message": "Not found", "statusCode": 404}
        else:
            status, reply = route(body)
        if split.path in OVERRIDES:  # negative testing: force a status, keep the body
            status = OVERRIDES[split.path]
        entry = {
            "seq": next(_seq),
            "method": self.command,
            "path": split.path,
            "query": split.query,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        if body_raw is not None:
            entry["body_raw"] = body_raw
        entry["reply_status"] = status
        with _lock:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if split.path.endswith("/chat/completions"):
            self.send_header("x-request-id", "req_" + uuid.uuid4().hex)
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = _handle

    def log_message(self, fmt, *args):  # keep stdout for the port line
        sys.stderr.write("record_server: " + (fmt % args) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", nargs="?", type=int, default=int(os.environ.get("RECORD_PORT", "0")))
    ap.add_argument("log", nargs="?", default=os.environ.get("RECORD_LOG", "record.jsonl"))
    ap.add_argument("--port-file")
    args = ap.parse_args(argv)
    Handler.log_path = os.path.abspath(args.log)
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    srv.daemon_threads = True
    port = srv.server_address[1]
    if args.port_file:
        with open(args.port_file, "w") as fh:
            fh.write(f"{port}\n")
    print(port, flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()

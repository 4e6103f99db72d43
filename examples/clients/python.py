#!/usr/bin/env python3
# Log LLM calls to llmlogd over its Unix socket (NDJSON), with the standard library only.
import json
import os
import socket
import sys

SOCKET = os.environ.get("LLMLOGD_SOCKET", "/run/llmlogd/llmlogd.sock")

events = [
    {"model": "gpt-4o", "input": "What is 2+2?", "output": "4", "client": "python"},
    {"model": "gpt-4o", "input": "And 3+3?", "output": "6", "client": "python"},
]

with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.settimeout(30)
    s.connect(SOCKET)
    replies = s.makefile("r", encoding="utf-8")
    for event in events:
        s.sendall(json.dumps(event).encode() + b"\n")  # one event per line
        line = replies.readline()
        reply = json.loads(line) if line else {"ok": False, "error": "connection closed"}
        if not reply["ok"]:  # the event was not stored; reply["error"] says why
            sys.exit(f"llmlogd refused the event: {reply['error']}")
        print("stored", reply["id"])

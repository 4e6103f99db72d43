#!/usr/bin/env python3
"""End-to-end driver for the official Python Pezzo client (PyPI `pezzo` 0.1.2).

Environment:
  PEZZO_SERVER_URL   (required) base URL of the Pezzo-compatible server, e.g. http://127.0.0.1:8080
                     The client POSTs to f"{PEZZO_SERVER_URL}/api/reporting/v2/request".
  OPENAI_BASE_URL    (required) base URL of an OpenAI-compatible mock INCLUDING /v1,
                     e.g. http://127.0.0.1:9090/v1 (OPENAI_API_BASE, the openai 0.27 name, works too).
  PEZZO_API_KEY      (default pez_test_api_key_0123456789)
  PEZZO_PROJECT_ID   (default test-project-id)
  PEZZO_ENVIRONMENT  (the client itself defaults to "Production")
  OPENAI_API_KEY     (default sk-test-openai-key; must be set before `pezzo.openai` is imported)
  EXTRAS=1           also exercise the cache path (/api/cache/v1/request/retrieve + /save)

The Python client only print()s a failed (non-2xx) report and carries on, so stdout is
captured and such messages turn into a non-zero exit. Connection errors and non-JSON error
replies are *raised* by the client into the caller (and make this script fail).
"""

import contextlib
import io
import json
import os
import sys

for _name in ("PEZZO_SERVER_URL",):
    if not os.environ.get(_name):
        sys.exit(f"{_name} must be set")
_openai_base = os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")
if not _openai_base:
    sys.exit("OPENAI_BASE_URL must be set")
os.environ.setdefault("PEZZO_API_KEY", "pez_test_api_key_0123456789")
os.environ.setdefault("PEZZO_PROJECT_ID", "test-project-id")
os.environ.setdefault("OPENAI_API_KEY", "sk-test-openai-key")

import openai  # noqa: E402  (openai 0.27.x, pinned by pezzo)

openai.api_base = _openai_base

from pezzo.client.classes import Prompt  # noqa: E402
# Documented usage is `from pezzo.openai import openai`: a PezzoOpenAI instance created at
# import time (it raises if OPENAI_API_KEY is unset).
from pezzo.openai import openai as pezzo_open_ai  # noqa: E402

failures = 0


def fail(msg):
    global failures
    failures += 1
    print(f"FAIL: {msg}", file=sys.stderr)


def step(name, fn):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = fn()
    except Exception as exc:  # noqa: BLE001
        fail(f"{name}: raised {type(exc).__name__}: {exc}")
        result = None
    finally:
        sys.stdout.write(out.getvalue())
    if any(s in out.getvalue() for s in ("Could not report", "Could not cache", "Could not fetch request")):
        fail(f"{name}: SDK reported: {out.getvalue().strip()}")
    if result is not None:
        print(f"{name}: SDK returned {json.dumps(result)}")


def check_completion(res):
    if not isinstance(res, dict) or res.get("object") != "chat.completion":
        raise RuntimeError(f"unexpected completion {res!r}")
    return res


# 1. Plain chat completion with variables and properties.
step(
    "chat-success",
    lambda: check_completion(
        pezzo_open_ai.ChatCompletion.create(
            model="gpt-4o-mini",
            temperature=0.2,
            max_tokens=64,
            messages=[
                {"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Say hello to {name} in {language}."},
            ],
            pezzo_options={
                "variables": {"name": "Ada", "language": "French"},
                "properties": {"userId": "user-123", "traceId": "trace-abc"},
            },
        )
    ),
)

# 2. Managed-prompt flow: what pezzo.get_prompt() would have returned.
_prompt = Prompt(
    metadata={"promptId": "clx0prompt000001", "promptVersionSha": "3f2a9c1", "type": "Prompt"},
    settings={"model": "gpt-3.5-turbo", "temperature": 0.7},
    content={"prompt": "Write a haiku about {topic}."},
)
step(
    "chat-managed-prompt",
    lambda: check_completion(
        pezzo_open_ai.ChatCompletion.create(pezzo_prompt=_prompt, pezzo_options={"variables": {"topic": "logs"}})
    ),
)


# 3. Provider error: reported with response.status = 404, then re-raised by the client.
def _error_call():
    try:
        pezzo_open_ai.ChatCompletion.create(
            model="nonexistent-model",
            messages=[{"role": "user", "content": "This call fails."}],
            pezzo_options={"properties": {"userId": "user-123"}},
        )
    except openai.error.OpenAIError as err:
        if err.http_status != 404:
            raise
        return {"rethrown": type(err).__name__, "status": err.http_status, "error": err.json_body}
    raise RuntimeError("expected the OpenAI call to fail with 404")


step("chat-error", _error_call)

# 4. The provider cannot be reached (connection refused): the client reports the failed call
#    with "body": null and "status": null (openai's APIConnectionError has neither), then
#    re-raises. llmlogd accepts the report and delivers it with an error body.
def _unreachable_call():
    saved = openai.api_base
    openai.api_base = "http://127.0.0.1:1/v1"
    try:
        pezzo_open_ai.ChatCompletion.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Nobody answers."}],
        )
    except openai.error.APIConnectionError as err:
        return {"rethrown": type(err).__name__}
    finally:
        openai.api_base = saved
    raise RuntimeError("expected the OpenAI call to fail to connect")


step("chat-unreachable", _unreachable_call)

# 5. Optional: request cache (two extra endpoints).
if os.environ.get("EXTRAS") == "1":
    step(
        "chat-cache-miss",
        lambda: check_completion(
            pezzo_open_ai.ChatCompletion.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Cache me."}],
                pezzo_options={"cache": True},
            )
        ),
    )

if failures:
    print(f"pezzo_py: {failures} failure(s)", file=sys.stderr)
    sys.exit(1)
print("pezzo_py: OK")

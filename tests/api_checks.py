"""Requests every backend must refuse with an OpenAI-style 4xx, shared by the torch and SGLang suites."""

import httpx

API_KEY = "test-key"

CHAT = "/v1/chat/completions"
GOOD_MESSAGES = [{"role": "user", "content": "hi"}]


INVALID_REQUESTS = [
    (CHAT, b"{not json", 400, "not valid JSON"),
    (CHAT, {"model": "student", "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": "nope", "messages": GOOD_MESSAGES}, 404, "does not exist"),
    (CHAT, {"model": "student", "messages": []}, 400, "messages"),
    (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "max_tokens": 65}, 400, "cap"),
    (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "temperature": -1}, 400, "temperature"),
    (CHAT, {"model": "student", "messages": GOOD_MESSAGES, "top_p": 0}, 400, "top_p"),
    (CHAT, {"model": "student", "messages": [{"role": "user", "content": "word " * 3000}]}, 400, "context window"),
    (CHAT, {"model": "student", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/completions", {"model": "student", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "student", "prompt": [1, 99999]}, 400, "token ids"),
    ("/v1/completions", {"model": "student", "prompt": "x", "max_tokens": 0}, 400, "echo"),
    ("/v1/completions", {"model": "student", "prompt": ["a", "b"], "stream": True}, 400, "single prompt"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


def assert_refused(server: str, path: str, body, status: int, fragment: str) -> None:
    """``body`` sent to ``path`` gets ``status`` with an OpenAI-style error naming ``fragment``."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if isinstance(body, bytes):
        response = httpx.post(server + path, content=body, headers=headers | {"content-type": "application/json"})
    else:
        response = httpx.post(server + path, json=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"].endswith("_error")

"""``zeda serve --moe-backend``: the Triton kernel serves the same greedy replies as torch; bad values are refused."""

from pathlib import Path

import httpx
import pytest

from zeda_cli.main import main
from zeda_server import sglang_engine
from zeda_server.launch import server_process
from zeda_server.lifecycle import DrainingServer

TINY_ZEDA = Path(__file__).resolve().parents[1] / "models" / "tiny-zeda"
PROMPTS = ["Sort: 3 1 2", "Add: 12 + 7", "Reverse: abc"]
MAX_TOKENS = 8  # the Triton interpreter is slow: few prompts, few tokens


def greedy_replies(moe_backend: str) -> list[str]:
    flags = ("--moe-backend", moe_backend, "--device", "cpu")
    with server_process(TINY_ZEDA, *flags, env={"TRITON_INTERPRET": "1"}) as (url, _process, _log):
        replies = []
        for prompt in PROMPTS:
            body = {"model": "tiny-zeda", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text
            replies.append(response.json()["choices"][0]["text"])
    return replies


@pytest.mark.slow
def test_triton_backend_serves_the_torch_replies() -> None:
    triton = greedy_replies("triton")
    assert any(triton) and triton == greedy_replies("torch")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--moe-backend", "bogus"), "moe_backend: Input should be 'auto', 'torch' or 'triton' (got 'bogus')"),
        (
            ("--moe-backend", "triton", "--device", "cpu"),
            "MoE backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got cpu",
        ),
        (("--backend", "sglang", "--moe-backend", "torch"), "--moe-backend torch applies to the torch engine"),
    ],
    ids=["unknown value", "triton without CUDA", "sglang"],
)
def test_bad_moe_backend_is_one_clear_error(flags: tuple[str, ...], message: str, monkeypatch, capsys) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for cls, method in ((DrainingServer, "run"), (sglang_engine.SglangEngine, "__init__")):
        monkeypatch.setattr(cls, method, lambda *_a, **_k: pytest.fail("zeda serve started instead of refusing"))
    assert main(["serve", "--model", str(TINY_ZEDA), "--port", "0", *flags]) == 2  # a ZedaError, not a traceback
    stderr = capsys.readouterr().err
    assert stderr.startswith("zeda serve: error: ") and message in stderr and stderr.count("\n") == 1, stderr

"""`make serve`'s request checks (held to the OpenAI API's rules before llama.cpp sees a request)
and `make chat`'s terminal handling, without a model: the HTTP layer is driven as an ASGI app."""

import asyncio
import json
import socket

import pytest

from lmtune.tools.openai_api import StrictRequests, request_error
from lmtune.tools.serve import port_in_use

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TURN = [{"role": "user", "content": "Who art thou?"}]


def call(app, path: str, body: bytes, headers=()) -> tuple[int, dict | None]:
    """One POST through an ASGI app: its status and parsed JSON answer (None when empty)."""
    sent = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(payload) if payload else None


def inner_app(received: list):
    """Stands in for llama.cpp's server: records the body it was handed and answers 200."""

    async def app(scope, receive, send):
        message = await receive()
        received.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        (CHAT, b"{not json", 400, None),
        (CHAT, b"", 400, None),
        (CHAT, b"[1, 2]", 400, None),
        (CHAT, {"messages": []}, 400, "messages"),
        (CHAT, {"messages": TURN, "max_tokens": -1}, 400, "max_tokens"),
        (CHAT, {"messages": TURN, "max_tokens": 0}, 400, "max_tokens"),
        (CHAT, {"messages": TURN, "max_tokens": 2.5}, 400, "max_tokens"),
        (CHAT, {"messages": TURN, "temperature": -0.5}, 400, "temperature"),
        (CHAT, {"messages": TURN, "temperature": 3}, 400, "temperature"),
        (CHAT, {"messages": TURN, "top_p": 1.5}, 400, "top_p"),
        (CHAT, {"messages": TURN, "n": 3}, 400, "n"),
        (CHAT, {"messages": TURN, "model": "smollm2-135m"}, 404, "model"),
        (COMPLETIONS, {"prompt": ""}, 400, "prompt"),
        (COMPLETIONS, {"prompt": "To be", "max_tokens": -5}, 400, "max_tokens"),
        (COMPLETIONS, {"prompt": [[1, 2], [3, 4]]}, 400, "prompt"),  # a batch: one prompt per request
        (COMPLETIONS, {"prompt": [[1, "two"]]}, 400, "prompt"),
        (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages",
        ),
        (CHAT, {"messages": TURN, "top_logprobs": 3}, 400, "top_logprobs"),
        (CHAT, {"messages": TURN, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        (CHAT, {"messages": TURN, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        (CHAT, {"messages": TURN, "tool_choice": "auto"}, 400, "tool_choice"),
        (
            CHAT,
            {"messages": [*TURN, {"role": "tool", "tool_call_id": "c1", "content": "42"}]},
            400,
            "messages",
        ),
    ],
)
def test_requests_the_openai_api_refuses_are_refused_naming_the_parameter(path, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    received = []
    got, answer = call(StrictRequests(inner_app(received), "smollm2_135m", None), path, raw)
    assert (got, answer["error"]["param"], answer["error"]["type"]) == (
        status,
        param,
        "invalid_request_error",
    )
    assert not received  # llama.cpp never saw it
    if status == 404:
        assert answer["error"]["code"] == "model_not_found" and "'smollm2_135m'" in answer["error"]["message"]


@pytest.mark.parametrize(
    "path, body",
    [
        (CHAT, {"messages": TURN}),
        (CHAT, {"messages": TURN, "model": "smollm2_135m", "max_tokens": 16, "temperature": 0, "n": 1}),
        (COMPLETIONS, {"prompt": "To be", "max_tokens": 0, "echo": True, "temperature": 2}),
        (COMPLETIONS, {"prompt": ["To be"], "max_tokens": None, "top_p": 1}),
        (COMPLETIONS, {"prompt": [[504, 314, 30]], "max_tokens": 4}),  # token ids, no echo: llama.cpp's
    ],
)
def test_valid_requests_reach_the_server_with_their_body_unchanged(path, body):
    raw, received = json.dumps(body).encode(), []
    status, _ = call(StrictRequests(inner_app(received), "smollm2_135m", None), path, raw)
    assert status == 200 and received == [raw]
    assert request_error(path, raw, "smollm2_135m") is None


def test_content_given_as_text_parts_reaches_the_server_as_the_text_it_stands_for():
    parts = [{"type": "text", "text": "Who art "}, {"type": "text", "text": "thou?"}]
    body = {"messages": [{"role": "user", "content": parts}], "stop": ["a", "b", "c", "d"]}
    received = []
    status, _ = call(
        StrictRequests(inner_app(received), "smollm2_135m", None), CHAT, json.dumps(body).encode()
    )
    assert status == 200 and json.loads(received[0])["messages"] == TURN


def test_tool_turns_that_answer_a_call_and_declined_tools_are_taken():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    turns = [*TURN, {"role": "assistant", "content": None, "tool_calls": calls}]
    answered = {"messages": [*turns, {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    declined = {
        "messages": TURN,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "none",
    }
    assert request_error(CHAT, json.dumps(declined).encode(), "smollm2_135m") is None
    with_tools = {**answered, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert request_error(CHAT, json.dumps(with_tools).encode(), "smollm2_135m", tools=True) is None
    status, error = request_error(CHAT, json.dumps(answered).encode(), "smollm2_135m")  # no tool support
    assert (
        status == 400
        and error["error"]["param"] == "messages"
        and "no tool support" in error["error"]["message"]
    )


def test_without_the_api_key_the_server_answers_first():
    """A request without the key gets the server's 401 whatever its body: its body is not judged."""
    received = []
    app = StrictRequests(inner_app(received), "smollm2_135m", "secret")
    assert call(app, CHAT, b"{not json")[0] == 200 and received == [b"{not json"]  # the stand-in's 200
    authorized = [(b"authorization", b"Bearer secret")]
    assert call(app, CHAT, b"{not json", authorized)[0] == 400 and len(received) == 1


def test_a_busy_port_is_found_before_the_server_starts(capsys):
    from lmtune.tools.serve import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        assert main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and f"PORT={port + 1}" in err


@pytest.fixture
def chat_cfg(smoke_cfg, tiny_base):
    from omegaconf import OmegaConf

    return OmegaConf.merge(
        smoke_cfg,
        {
            "paths": {"merged": str(tiny_base)},
            "model": {"chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"},
            "sample": {"max_new_tokens": 8, "do_sample": False},
        },
    )


def _chat(chat_cfg, tiny_base):
    """`make chat`'s model object on the tiny model, with a chat template the tiny tokenizer lacks."""
    import torch

    from lmtune.checkpoint import load_tokenizer
    from lmtune.model.load import load_full
    from lmtune.tools.chat import Chat

    chat = Chat.__new__(Chat)
    chat.label, chat.cfg, chat.history = "fine-tuned", chat_cfg, []
    chat.tokenizer = load_tokenizer(str(tiny_base))
    chat.tokenizer.chat_template = chat_cfg.model.chat_template
    chat.model = load_full(str(tiny_base), torch.float32)
    return chat


def test_chat_keeps_the_conversation_within_the_models_context(chat_cfg, tiny_base, capsys):
    from lmtune import LmtuneError

    chat = _chat(chat_cfg, tiny_base)
    chat.model.config.max_position_embeddings = 48  # 40 tokens of conversation, 8 of reply
    for turn in ("thou art", "more words of the play", "and yet more of them here"):
        chat.reply(turn)
        assert chat.prompt().shape[1] <= 40
    assert "oldest turns no longer fit the model's context" in capsys.readouterr().out
    assert chat.history[-2]["content"] == "and yet more of them here"
    with pytest.raises(LmtuneError, match=r"does not fit the model's 48-token context: send a shorter one"):
        chat.reply("word " * 60)
    assert chat.history == []  # the refused message is not kept


def test_ctrl_c_during_a_reply_stops_that_reply_not_the_chat(chat_cfg, tiny_base):
    from omegaconf import OmegaConf

    chat = _chat(OmegaConf.merge(chat_cfg, {"sample": {"max_new_tokens": 200}}), tiny_base)

    class Terminal:
        """Ctrl-C arrives while the first piece of the reply is being shown."""

        def __init__(self):
            self.text, self.pieces = "", 0

        def write(self, text):
            self.text += text
            if self.text.startswith("fine-tuned> ") and text != "fine-tuned> " and self.pieces == 0:
                self.pieces += 1
                raise KeyboardInterrupt

        def flush(self):
            pass

    terminal = Terminal()
    answer = chat.reply("thou art", out=terminal)
    assert terminal.text.endswith(" [stopped]\n")
    assert len(chat.tokenizer(answer)["input_ids"]) < 100  # generation stopped, not 200 tokens on
    assert chat.history[-1] == {"role": "assistant", "content": answer}


def test_piped_chat_skips_blank_lines_and_ctrl_c_at_the_prompt_quits(
    chat_cfg, tiny_base, monkeypatch, capsys
):
    import io

    import lmtune.config
    from lmtune.tools import chat

    monkeypatch.setattr(lmtune.config, "load", lambda overrides: chat_cfg)
    monkeypatch.setattr(
        chat.Chat,
        "__init__",
        lambda self, label, path, cfg: self.__dict__.update(vars(_chat(chat_cfg, tiny_base)), label=label),
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("Who art thou?\n\n\nWhence comest thou?\n"))
    assert chat.main([]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 2 and out.count("fine-tuned> ") == 2 and "Whence comest thou?" in out

    class Typed(io.StringIO):
        def isatty(self):
            return True

    def ctrl_c(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", Typed())
    monkeypatch.setattr("builtins.input", ctrl_c)
    assert chat.main([]) == 0  # no traceback


def test_a_prompt_of_bare_token_ids_reaches_the_server_as_its_one_prompt():
    received = []
    app = StrictRequests(inner_app(received), "smollm2_135m", None)
    assert call(app, COMPLETIONS, json.dumps({"prompt": [504, 314, 30], "max_tokens": 4}).encode())[0] == 200
    assert json.loads(received[0]) == {"prompt": [[504, 314, 30]], "max_tokens": 4}

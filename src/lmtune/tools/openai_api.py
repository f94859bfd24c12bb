"""`make serve`'s HTTP API held to the OpenAI API's rules, on llama.cpp's server
(llama-cpp-python's `[server]`): what its routes would take silently or answer with 500 is refused
with the OpenAI API's errors first, and token-id prompts are taken, as the OpenAI API takes them.

A body that is not a JSON object, an empty `messages`, a negative `max_tokens` or a `temperature`
outside [0, 2] get 400 `invalid_request_error` naming the parameter; a `model` other than the one
served gets 404 `model_not_found`, so a client's typo is noticed. A prompt of token ids with `echo`
(how lm-eval's `local-completions` model asks for log-likelihoods) is scored here on the server's
model: exactly the tokens the client sent.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid

import torch
from starlette.responses import JSONResponse


def accept_token_id_prompts() -> None:
    """The OpenAI completions API takes a prompt as token ids too (lm-eval's `local-completions`
    model sends them for log-likelihood tasks, so that it scores exactly the tokens it means);
    llama-cpp-python's request model admits text only, though its Llama takes ids. The field is
    widened before the server's routes are built from it (they are, when its app module loads)."""
    from llama_cpp.server.types import CreateCompletionRequest

    field = CreateCompletionRequest.model_fields["prompt"]
    field.annotation = str | list[str] | list[list[int]]
    CreateCompletionRequest.model_rebuild(force=True)


def answer_bad_requests_with_400() -> None:
    """llama-cpp-python's routes answer a request that fails validation (messages not a list, a
    missing prompt) with 500, as if the server had failed; the OpenAI API, and its clients, expect
    400 invalid_request_error naming the field. The route class's error mapping is extended for it."""
    from fastapi.exceptions import RequestValidationError
    from llama_cpp.server.errors import ErrorResponse, RouteErrorHandler

    if getattr(RouteErrorHandler, "_lmtune_400", False):
        return
    library_mapping = RouteErrorHandler.error_message_wrapper

    def error_message_wrapper(self, error, body=None):
        if isinstance(error, RequestValidationError):
            fields = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
            return 400, ErrorResponse(message=fields, type="invalid_request_error", param=None, code=None)
        return library_mapping(self, error, body)

    RouteErrorHandler.error_message_wrapper = error_message_wrapper
    RouteErrorHandler._lmtune_400 = True


CHECKED = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}  # route → its input
RANGES = {  # parameter → (lowest, highest) the OpenAI API accepts
    "temperature": (0, 2),
    "top_p": (0, 1),
    "presence_penalty": (-2, 2),
    "frequency_penalty": (-2, 2),
    "top_logprobs": (0, 20),
}


def _refusal(status: int, message: str, param: str | None, code: str | None = None) -> tuple[int, dict]:
    return status, {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


def request_error(path: str, body: bytes, served: str, tools: bool = False) -> tuple[int, dict] | None:
    """The OpenAI API's answer (status, body) to a request it refuses, or None for a valid one.
    Only what llama.cpp's server would otherwise take silently or answer with 500 is checked here;
    the rest of the schema stays with the server's own validation (400 naming the field). `tools`:
    whether the served model's chat template writes tool use out."""
    try:
        request = json.loads(body or b"null")
    except ValueError:
        return _refusal(400, "the body is not valid JSON: send a JSON object", None)
    if not isinstance(request, dict):
        return _refusal(400, "the body must be a JSON object with the request's parameters", None)
    model = request.get("model")
    if model is not None and model != served:
        return _refusal(
            404,
            f"the model '{model}' does not exist: this server serves '{served}' (GET /v1/models)",
            "model",
            "model_not_found",
        )
    field = CHECKED[path]
    given = request.get(field)
    if field == "messages" and (not isinstance(given, list) or not given):
        return _refusal(400, "messages must be a non-empty list of {role, content} turns", "messages")
    if field == "messages" and (refused := _turns_error(given)):
        return refused
    if field == "messages" and (refused := _chat_options_error(request, tools)):
        return refused
    if field == "prompt" and given in ("", [], None):
        return _refusal(
            400, "prompt must be a non-empty string, or a list of one string or of token ids", "prompt"
        )
    if field == "prompt" and isinstance(given, list) and not _token_ids(given):
        if len(given) > 1:
            return _refusal(400, "one prompt per request (lm-eval: batch_size=1)", "prompt")
        if isinstance(given[0], list) and not _token_ids(given[0]):
            return _refusal(400, "a tokenized prompt is a non-empty list of token ids (integers)", "prompt")
    lowest = 1 if field == "messages" else 0  # completions: 0 new tokens with echo scores the prompt
    for name in ("max_tokens", "max_completion_tokens"):
        value = request.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < lowest):
            return _refusal(
                400, f"{name} must be an integer of at least {lowest}, or null; got {value!r}", name
            )
    for name, (low, high) in RANGES.items():
        value = request.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            return _refusal(400, f"{name} must be a number from {low} to {high}; got {value!r}", name)
    if request.get("n", 1) != 1:
        return _refusal(400, "n must be 1: this server returns one choice per request", "n")
    return None


def _turns_error(messages: list) -> tuple[int, dict] | None:
    """Each turn as the OpenAI API takes it: content text, or a list of text parts (images and
    audio are refused: the model reads text); null content only on an assistant turn that calls
    tools; a tool turn only after an assistant turn with tool_calls."""
    for i, turn in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return _refusal(400, f"{where} must be a {{role, content}} object", "messages")
        content, role = turn.get("content"), turn["role"]
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    return _refusal(
                        400,
                        f"{where}.content: a part of type {kind!r}: this model reads text only "
                        '({"type": "text", "text": ...} parts)',
                        "messages",
                    )
        elif content is None and not (role == "assistant" and turn.get("tool_calls")):
            return _refusal(
                400, f"{where}.content is null: a {role} turn needs content (text or text parts)", "messages"
            )
        elif content is not None and not isinstance(content, str):
            return _refusal(400, f"{where}.content must be text or a list of text parts", "messages")
        if role == "tool":
            before = messages[i - 1] if i else {}
            if not isinstance(before, dict) or not (before.get("role") == "tool" or before.get("tool_calls")):
                return _refusal(
                    400,
                    f"{where}: a tool turn must answer an assistant turn's tool_calls (none precedes it)",
                    "messages",
                )
    return None


def _chat_options_error(request: dict, tools: bool) -> tuple[int, dict] | None:
    """Options llama.cpp's server would take and ignore: refused as the OpenAI API refuses them."""
    if request.get("top_logprobs") is not None and not request.get("logprobs"):
        return _refusal(400, "top_logprobs needs logprobs: true", "top_logprobs")
    stop = request.get("stop")
    if isinstance(stop, list) and len(stop) > 4:
        return _refusal(400, f"stop takes at most 4 sequences; got {len(stop)}", "stop")
    history = [m for m in request["messages"] if m.get("role") == "tool" or m.get("tool_calls")]
    if history and not tools:
        return _refusal(
            400,
            "messages hold tool calls or tool results, but this model's chat template has no tool "
            "support: it cannot show them to the model",
            "messages",
        )
    declined = "none" in (request.get("tool_choice"), request.get("function_call"))  # no call wanted
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if request.get(name) is not None and not tools and not declined:
            return _refusal(
                400,
                f"{name}: this model's chat template has no tool support, so it cannot be given tools; "
                "serve a model whose template has (Qwen, Llama 3.1), or send the request without them",
                name,
            )
    return None


def text_of_parts(body: bytes) -> bytes:
    """A chat body whose turns' content is a list of text parts, with each such content joined into
    the text it stands for (what chat templates read); other bodies unchanged."""
    request = json.loads(body)
    turns = request.get("messages")
    if not any(isinstance(t.get("content"), list) for t in turns):
        return body
    joined = [
        {**t, "content": "".join(p["text"] for p in t["content"])}
        if isinstance(t.get("content"), list)
        else t
        for t in turns
    ]
    return json.dumps({**request, "messages": joined}).encode()


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def one_prompt_of_ids(body: bytes) -> bytes:
    """A completions body whose prompt is bare token ids ([1, 2, 3], as the OpenAI API allows)
    with the ids wrapped as the one prompt of a list ([[1, 2, 3]]), the form the server reads."""
    request = json.loads(body)
    if not _token_ids(request.get("prompt")):
        return body
    return json.dumps({**request, "prompt": [request["prompt"]]}).encode()


class Vocabulary:
    """The served GGUF's tokenizer and chat template, read by llama.cpp without the weights (a
    second, vocabulary-only load: no lock shared with the model that serves)."""

    def __init__(self, gguf: str):
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
        template = self.llm.metadata.get("tokenizer.chat_template")
        text = lambda token: self.llm.detokenize([token], special=True).decode() if token >= 0 else ""  # noqa: E731
        eos = self.llm.token_eos()
        self.formatter = (
            Jinja2ChatFormatter(template, text(eos), text(self.llm.token_bos()), stop_token_ids=[eos])
            if template
            else None
        )

    def renders_tools(self) -> bool:
        """Whether the chat template writes a tool's schema into the prompt (as data.sequences asks
        of a template that trains on tool use)."""
        if self.formatter is None:
            return False
        tool = {"type": "function", "function": {"name": "lmtune_probe_lookup", "parameters": {}}}
        try:
            prompt = self.formatter(messages=[{"role": "user", "content": "?"}], tools=[tool]).prompt
        except Exception:  # a Jinja template's own error: any kind
            return False
        return "lmtune_probe_lookup" in prompt

    def usage(self, request: dict, completion: str) -> dict:
        """The OpenAI `usage` of a streamed chat completion: the prompt as the server renders and
        tokenizes it, and the completion's text tokenized."""
        result = self.formatter(messages=request["messages"], tools=request.get("tools"))
        prompt = self.llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
        answer = self.llm.tokenize(completion.encode(), add_bos=False) if completion else []
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(answer),
            "total_tokens": len(prompt) + len(answer),
        }


def _with_usage(send, vocabulary: Vocabulary, request: dict):
    """`send` for a chat stream that asked for `stream_options.include_usage`: the server's chunks
    pass as they are, and one more chunk with no choices and the request's `usage` comes before
    `data: [DONE]`, as the OpenAI API sends it."""
    said, last = [], {}

    async def send_with_usage(message):
        if message["type"] == "http.response.body":
            for line in message.get("body", b"").decode().splitlines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[len("data: ") :])
                    last.update(id=chunk.get("id"), created=chunk.get("created"), model=chunk.get("model"))
                    said.extend(c.get("delta", {}).get("content") or "" for c in chunk.get("choices", []))
                elif line.strip() == "data: [DONE]":
                    usage = {**last, "object": "chat.completion.chunk", "choices": []}
                    usage["usage"] = vocabulary.usage(request, "".join(said))
                    await send(
                        {**message, "body": f"data: {json.dumps(usage)}\n\n".encode(), "more_body": True}
                    )
        await send(message)

    return send_with_usage


class StrictRequests:
    """ASGI middleware: reads the body of a completion request, answers it with the OpenAI API's
    error when `request_error` refuses it, else hands the body on (text parts joined into text).
    Requests without the server's API key go on untouched, so they get 401 whatever their body.
    With the served model's `vocabulary`, tools are refused when its template has no tool support,
    and streams that ask for usage get it."""

    def __init__(self, app, served: str, api_key: str | None, vocabulary: Vocabulary | None = None):
        self.app, self.served, self.api_key, self.vocabulary = app, served, api_key, vocabulary
        self.tools = vocabulary is not None and vocabulary.renders_tools()

    async def _score(self, request: dict) -> dict:
        """A prompt of token ids with echo (how lm-eval asks for log-likelihoods): scored here on the
        server's own model, under the server's lock. llama-cpp-python's echo handles text prompts
        only, and a text prompt is tokenized again (with its BOS), so the tokens scored would not be
        the ones the client counted."""
        from contextlib import asynccontextmanager

        from llama_cpp.server import app as server
        from starlette.concurrency import run_in_threadpool

        if request.get("temperature", 1) != 0 and request.get("max_tokens", 16) != 0:
            return _refusal(
                400, "echo with a token-id prompt continues greedily: set temperature=0", "temperature"
            )[1]
        async with asynccontextmanager(server.get_llama_proxy)() as proxy:
            llama = proxy(self.served)
            choice = await run_in_threadpool(
                echo_logprobs,
                llama,
                request["prompt"][0],
                request.get("max_tokens", 16),
                request.get("logprobs"),
            )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.served,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(request["prompt"][0]),
                "completion_tokens": len(choice["logprobs"]["tokens"]) - len(request["prompt"][0]),
                "total_tokens": len(choice["logprobs"]["tokens"]),
            },
        }

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in CHECKED:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and headers.get(b"authorization", b"") != f"Bearer {self.api_key}".encode():
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        refused = request_error(scope["path"], body, self.served, self.tools)
        if refused:
            return await JSONResponse(refused[1], status_code=refused[0])(scope, receive, send)
        if scope["path"] == "/v1/chat/completions":
            body = text_of_parts(body)
            request = json.loads(body)
            if request.get("stream") and (request.get("stream_options") or {}).get("include_usage"):
                if self.vocabulary is not None and self.vocabulary.formatter is not None:
                    send = _with_usage(send, self.vocabulary, request)
        if scope["path"] == "/v1/completions":
            body = one_prompt_of_ids(body)
            request = json.loads(body)
            if request.get("echo") and _token_ids((request["prompt"] or [None])[0]):
                answer = await self._score(request)
                return await JSONResponse(answer, status_code=200 if "choices" in answer else 400)(
                    scope, receive, send
                )
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # what follows the body: a disconnect
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def echo_logprobs(llama, ids: list[int], max_tokens: int, top: int | None) -> dict:
    """A completion choice for `ids` echoed: every prompt token's log-probability given those
    before it (the first has none), then `max_tokens` greedy tokens, with the `top` most likely
    tokens at each position; log-softmax in fp32 over llama.cpp's logits, as the eval stage's."""
    llama.reset()
    llama.eval(list(ids))
    tokens, logprobs, tops = list(ids), [None], [None]
    logits = torch.from_numpy(llama.scores[: len(ids)].copy()).float()
    for _ in range(max_tokens):
        nxt = int(logits[-1].argmax())
        if nxt == llama.token_eos():
            break
        tokens.append(nxt)
        llama.eval([nxt])
        logits = torch.cat(
            [logits, torch.from_numpy(llama.scores[len(tokens) - 1 : len(tokens)].copy()).float()]
        )
    logp = torch.log_softmax(logits, dim=-1)
    for position in range(1, len(tokens)):
        row = logp[position - 1]
        logprobs.append(float(row[tokens[position]]))
        best = row.topk(max(top or 1, 1))
        tops.append({_piece(llama, int(t)): float(v) for v, t in zip(best.values, best.indices, strict=True)})
    pieces = [_piece(llama, t) for t in tokens]
    offsets = list(itertools.accumulate(map(len, pieces), initial=0))[:-1]  # where each piece starts
    return {
        "text": "".join(pieces),
        "index": 0,
        "logprobs": {
            "tokens": pieces,
            "text_offset": offsets,
            "token_logprobs": logprobs,
            "top_logprobs": tops,
        },
        "finish_reason": "length" if len(tokens) - len(ids) == max_tokens else "stop",
    }


def _piece(llama, token: int) -> str:
    return llama.detokenize([token]).decode("utf-8", errors="replace")

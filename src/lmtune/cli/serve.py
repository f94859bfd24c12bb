"""`make serve`: the fine-tuned model behind an OpenAI-compatible HTTP API, on llama.cpp's server
(llama-cpp-python's `[server]`), on a CPU.

    python -m lmtune.cli.serve [--host 127.0.0.1] [--port 8000] [--n-ctx N] [--model-name NAME]
    LMTUNE_API_KEY=secret python -m lmtune.cli.serve       # clients then send it as their API key

It serves models/quantized/model.gguf when the quantize stage made one (quantize=gguf_*); else it
exports models/merged once to .cache/serve/model.q8_0.gguf, and again only when models/merged
changes. The chat template is the tokenizer's, carried inside the GGUF: the one training used.
On a GPU, vLLM serves the merged checkpoint directly: `vllm serve models/merged`.

Requests are held to the OpenAI API's rules before llama.cpp sees them (`StrictRequests`): a body
that is not a JSON object, an empty `messages`, a negative `max_tokens` or a `temperature` outside
[0, 2] get 400 `invalid_request_error` naming the parameter; a `model` other than the one served
gets 404 `model_not_found`, so a client's typo is noticed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from lmtune import LmtuneError
from lmtune.checkpoint import ModelError
from lmtune.cli.params import no_model

EXPORTED = Path(".cache") / "serve" / "model.q8_0.gguf"


def _stamp(folder: Path) -> dict:
    """What identifies a checkpoint on disk cheaply: each file's size and modification time."""
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()}


def gguf_to_serve(cfg, exported: Path = EXPORTED) -> Path:
    """The pipeline's GGUF, or models/merged exported to one (q8_0: close to the merged model)."""
    quantized = Path(cfg.paths.quantized) / "model.gguf"
    if cfg.quantize.method.startswith("gguf_") and quantized.is_file():
        return quantized
    merged = Path(cfg.paths.merged)
    if not (merged / "config.json").is_file():
        raise ModelError(no_model(merged))
    stamp = exported.with_suffix(".json")
    if exported.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == _stamp(merged):
        return exported
    from lmtune.export.gguf import export_gguf

    print(f"quantize.method={cfg.quantize.method} made no GGUF: exporting {merged} to {exported} (q8_0)")
    exported.parent.mkdir(parents=True, exist_ok=True)
    partial = exported.with_suffix(".partial")
    export_gguf(merged, partial, "q8_0")
    partial.replace(exported)
    stamp.write_text(json.dumps(_stamp(merged)))
    return exported


def _answer_bad_requests_with_400() -> None:
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


def request_error(path: str, body: bytes, served: str) -> tuple[int, dict] | None:
    """The OpenAI API's answer (status, body) to a request it refuses, or None for a valid one.
    Only what llama.cpp's server would otherwise take silently or answer with 500 is checked here;
    the rest of the schema stays with the server's own validation (400 naming the field)."""
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
    if field == "prompt" and given in ("", [], None):
        return _refusal(400, "prompt must be a non-empty string or list of strings", "prompt")
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


class StrictRequests:
    """ASGI middleware: reads the body of a completion request, answers it with the OpenAI API's
    error when `request_error` refuses it, else hands the same body on. Requests without the
    server's API key go on untouched, so they get 401 whatever their body."""

    def __init__(self, app, served: str, api_key: str | None):
        self.app, self.served, self.api_key = app, served, api_key

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
        refused = request_error(scope["path"], body, self.served)
        if refused:
            from starlette.responses import JSONResponse

            return await JSONResponse(refused[1], status_code=refused[0])(scope, receive, send)
        delivered = False

        async def replay():
            nonlocal delivered
            if delivered:
                return await receive()  # what follows the body: a disconnect
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    from lmtune.config import load

    parser = argparse.ArgumentParser(prog="python -m lmtune.cli.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--n-ctx", type=int, default=0, help="context length in tokens (default: the model's own)"
    )
    parser.add_argument("--model-name", help="the name clients ask for (default: model.name of the config)")
    parser.add_argument("--gguf", help="serve this GGUF instead of the pipeline's")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if port_in_use(args.host, args.port):  # before exporting anything or loading the model
        print(
            f"error: port {args.port} on {args.host} is in use (another `make serve`?): "
            f"stop it, or pick another port (make serve PORT={args.port + 1})",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = load(args.overrides)
        gguf = Path(args.gguf) if args.gguf else gguf_to_serve(cfg)
        if not gguf.is_file():
            raise ModelError(f"--gguf {gguf}: no such file")
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    _answer_bad_requests_with_400()
    api_key = os.environ.get("LMTUNE_API_KEY") or None  # from the environment: never on a command line
    server = ServerSettings(host=args.host, port=args.port, api_key=api_key)
    served = args.model_name or cfg.model.name
    model = ModelSettings(model=str(gguf), model_alias=served, n_ctx=args.n_ctx, verbose=False)
    app = StrictRequests(create_app(server_settings=server, model_settings=[model]), served, api_key)
    print(
        f"serving {gguf} as model '{served}' on http://{args.host}:{args.port}/v1 "
        f"(OpenAI API{', API key required' if api_key else ''}); Ctrl-C stops it",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

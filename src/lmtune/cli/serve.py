"""`make serve`: the fine-tuned model behind an OpenAI-compatible HTTP API, on llama.cpp's server
(llama-cpp-python's `[server]`), on a CPU.

    python -m lmtune.cli.serve [--host 127.0.0.1] [--port 8000] [--n-ctx 2048]
    LMTUNE_API_KEY=secret python -m lmtune.cli.serve       # clients then send it as their API key

It serves models/quantized/model.gguf when the quantize stage made one (quantize=gguf_*); else it
exports models/merged once to .cache/serve/model.q8_0.gguf, and again only when models/merged
changes. The chat template is the tokenizer's, carried inside the GGUF: the one training used.
On a GPU, vLLM serves the merged checkpoint directly: `vllm serve models/merged`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmtune import LmtuneError
from lmtune.checkpoint import ModelError

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
        raise ModelError(f"{merged} holds no model: run the pipeline first (make run), or dvc pull it")
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


def main(argv: list[str] | None = None) -> int:
    from lmtune.config import load

    parser = argparse.ArgumentParser(prog="python -m lmtune.cli.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--n-ctx", type=int, default=2048, help="context length in tokens")
    parser.add_argument("--gguf", help="serve this GGUF instead of the pipeline's")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
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
    model = ModelSettings(model=str(gguf), model_alias=cfg.model.name, n_ctx=args.n_ctx, verbose=False)
    app = create_app(server_settings=server, model_settings=[model])
    print(
        f"serving {gguf} as model '{cfg.model.name}' on http://{args.host}:{args.port}/v1 "
        f"(OpenAI API{', API key required' if api_key else ''}); Ctrl-C stops it",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make serve`: the fine-tuned model behind an OpenAI-compatible HTTP API, on llama.cpp's server
(llama-cpp-python's `[server]`), on a CPU.

    python -m lmtune.tools.serve [--host 127.0.0.1] [--port 8000] [--n-ctx N] [--model-name NAME]
    LMTUNE_API_KEY=secret python -m lmtune.tools.serve       # clients then send it as their API key

It serves models/quantized/model.gguf when the quantize stage made one (quantize=gguf_*); else it
exports models/merged once to .cache/serve/model.q8_0.gguf, and again only when models/merged
changes. The chat template is the tokenizer's, carried inside the GGUF: the one training used.
On a GPU, vLLM serves the merged checkpoint directly: `vllm serve models/merged`.
Requests are held to the OpenAI API's rules first (lmtune.tools.openai_api).
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
from lmtune.pipeline.params import no_model

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


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    from lmtune.config import load

    parser = argparse.ArgumentParser(prog="python -m lmtune.tools.serve", description=__doc__.splitlines()[0])
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
        from lmtune.export.llamacpp import check_decodes

        check_decodes(gguf)  # a llama.cpp that crashes on it is named here, before serving
    except LmtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    from lmtune.tools.openai_api import (
        StrictRequests,
        Vocabulary,
        accept_token_id_prompts,
        answer_bad_requests_with_400,
    )

    accept_token_id_prompts()
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    answer_bad_requests_with_400()
    api_key = os.environ.get("LMTUNE_API_KEY") or None  # from the environment: never on a command line
    server = ServerSettings(host=args.host, port=args.port, api_key=api_key)
    served = args.model_name or cfg.model.name
    model = ModelSettings(model=str(gguf), model_alias=served, n_ctx=args.n_ctx, verbose=False)
    app = StrictRequests(
        create_app(server_settings=server, model_settings=[model]), served, api_key, Vocabulary(str(gguf))
    )
    print(
        f"serving {gguf} as model '{served}' on http://{args.host}:{args.port}/v1 "
        f"(OpenAI API{', API key required' if api_key else ''}); Ctrl-C stops it",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

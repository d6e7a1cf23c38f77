"""See what a trained model thinks: a local page that streams samples with each character's
odds, scores any text character by character, and compares two runs on one prompt.

Usage: python serve.py [--run latest] [--checkpoint export] [--runs-dir runs] [--host 127.0.0.1]
                       [--port 8000]

The page is served from static/ (no CDN: it works offline). The API under it, JSON in and out:
    GET  /health         the server is up: the runs folder, the models loaded, the generations
                         streaming now
    GET  /api/runs       the runs under the runs folder, newest first, with results.json's
                         full-split val loss and bits per character, and their checkpoints
    POST /api/generate   {"run", "checkpoint", "prompt", "max_new_tokens", "temperature",
                         "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop"}
                         (inference.py's flags and defaults): a stream of JSON lines, a start
                         event, one event per character (its probability and the top ten
                         candidates before and after the sampling settings), an end event with
                         the tokens, tokens/s and the seed. The same run, prompt and seed give
                         the characters inference.py gives on the same device.
    POST /api/score      {"run", "checkpoint", "text"}: each character's surprise in bits and
                         the text's bits per character
A bad request is answered 4xx with {"error": "<the line the command line prints>"}; a model
that does not fit in memory, 503 with the same kind of line.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import ipaddress
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from utils import console
from utils.config_loader import ArgumentParser
from utils.device import resolve_device
from utils.errors import USER_ERRORS, UserError
from utils.run_catalog import EXPORT, LATEST, RunCatalog
from utils.serving import (
    GenerationRequest,
    Limits,
    ModelCache,
    ScoreRequest,
    check_score_length,
    generation_events,
    prepare_prompt,
    score_text,
)

STATIC = Path(__file__).resolve().parent / "static"
BODY_FIELDS = {"/api/generate": set(GenerationRequest.model_fields),
               "/api/score": set(ScoreRequest.model_fields)}
LOOPBACK = "127.0.0.1"
LISTEN_BACKLOG = 128
SHUTDOWN_GRACE_SECONDS = 2


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, allow_abbrev=False,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--run", default=LATEST,
        help="the run the page opens on: a folder name under --runs-dir, or 'latest' for the "
             "newest run with the checkpoint asked for (default: latest)")
    add("--checkpoint", metavar="NAME", default=EXPORT,
        help="what the page opens on: the run's final export, or a training checkpoint (last, "
             "best or step_N) of a run still training (default: export)")
    add("--runs-dir", type=Path, default=Path("runs"),
        help="the runs the page lists and serves; only runs inside it (default: runs)")
    add("--host", default=LOOPBACK,
        help="address to listen on (default: 127.0.0.1, this machine only); 0.0.0.0 opens "
             "the page to the network")
    add("--port", type=int, default=8000,
        help="port to listen on; 0 = any free one, printed (default: 8000)")
    add("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default: cpu)")
    add("--num-threads", type=int, default=1,
        help="CPU threads each generation step uses (default: 1, the faster for small models "
             "alone and shared alike: BENCHMARKS.md)")
    add("--max-loaded", type=int, default=3,
        help="models kept loaded at once; the least recently used goes first (default: 3)")
    add("--max-new-tokens", type=int, default=Limits.max_new_tokens,
        help=f"the most characters one generation may ask for (default: "
             f"{Limits.max_new_tokens})")
    add("--max-score-chars", type=int, default=Limits.max_score_chars,
        help=f"the longest text one score, or one prompt, may ask for (default: "
             f"{Limits.max_score_chars})")
    return parser


class ActiveGenerations:
    """How many generations are streaming now (GET /health shows it), and the signal that
    ends them all when the server stops."""

    def __init__(self) -> None:
        self.count = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def track(self, events: Iterator[dict[str, Any]]) -> Iterator[str]:
        """The events as JSON lines, counted as active from the first to the last, or until
        the client goes away and the stream is closed, or the server stops."""
        with self._lock:
            self.count += 1
        try:
            for event in events:
                if self.stopping.is_set():
                    yield json_line({"type": "error", "error": "the server is stopping"})
                    return
                yield json_line(event)
        except USER_ERRORS as error:  # after the stream began: the last line says why
            yield json_line({"type": "error", "error": str(error)})
        except (MemoryError, RuntimeError) as error:
            if not console.is_out_of_memory(error):
                raise
            yield json_line({"type": "error", "error": OUT_OF_MEMORY})
        finally:
            with self._lock:
                self.count -= 1


OUT_OF_MEMORY = ("out of memory: the model, its prompt and the generations running now do not "
                 "fit; ask for fewer characters, or start serve.py with a lower --max-loaded")


def json_line(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False) + "\n"


def create_app(catalog: RunCatalog, cache: ModelCache, limits: Limits, default_run: str,
               default_checkpoint: str = EXPORT) -> FastAPI:
    """The page and its API over the runs of catalog; the page opens on the default run and
    checkpoint."""
    app = FastAPI(title="chargpt", docs_url=None, redoc_url=None, openapi_url=None)
    active = app.state.generations = ActiveGenerations()

    async def user_error(_: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=400)

    for error_type in USER_ERRORS:  # UserError, and the core's own (a corrupt tokenizer...)
        app.add_exception_handler(error_type, user_error)

    @app.exception_handler(RuntimeError)
    async def out_of_memory(_: Request, error: Exception) -> JSONResponse:
        if not console.is_out_of_memory(error):
            raise error
        return JSONResponse({"error": OUT_OF_MEMORY}, status_code=503)

    app.add_exception_handler(MemoryError, out_of_memory)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code,
                            headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        fields = BODY_FIELDS.get(request.url.path, set())
        return JSONResponse({"error": describe_invalid(error, fields)}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "runs_dir": str(catalog.runs_dir),
                "loaded": cache.loaded(), "active_generations": active.count}

    @app.get("/api/runs")
    def runs() -> dict[str, Any]:
        return {"default": default_run, "default_checkpoint": default_checkpoint,
                "runs": [vars(s) for s in catalog.summaries()]}

    @app.post("/api/generate")
    async def generate(request: GenerationRequest) -> StreamingResponse:
        sampling = request.sampling(limits)  # refused before any model is loaded for it
        loaded = await run_in_threadpool(cache.get, request.run, request.checkpoint)
        prompt_ids, seed = await run_in_threadpool(prepare_prompt, loaded, request)
        events = generation_events(loaded, request, sampling, prompt_ids, seed)
        # a plain iterator: Starlette draws each line in a worker thread, off the event loop,
        # and stops drawing (and closes it) when the client goes away
        return StreamingResponse(active.track(events), media_type="application/x-ndjson")

    @app.post("/api/score")
    def score(request: ScoreRequest) -> dict[str, Any]:
        check_score_length(request.text, limits)  # refused before any model is loaded for it
        return score_text(cache.get(request.run, request.checkpoint), request.text, limits)

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def describe_invalid(error: RequestValidationError, fields: set[str]) -> str:
    """The first problem pydantic found in a request body, as one line in the command
    line's words; fields are the ones the endpoint takes."""
    problem = error.errors()[0]
    where = [str(part) for part in problem.get("loc", ()) if part != "body"]
    kind = problem.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {problem.get('msg', '')}"
    if not where:
        return (f"the request body must be a JSON object of the fields "
                f"{', '.join(sorted(fields))}: {problem.get('msg', 'invalid')}")
    name = where[0]
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(name, sorted(fields - {name}), n=1)
        hint = (f"did you mean {close[0]!r}?" if close else
                f"this endpoint takes {', '.join(sorted(fields))}")
        return f"unknown field {name[:100]!r}; {hint}"
    if kind == "missing":
        return f"the field {name!r} is required"
    expected = {"float": "a finite number", "int": "an integer", "string": "text",
                "list": "a list of strings", "model": "a JSON object"}
    for prefix, words in expected.items():
        if kind.startswith(prefix):
            value = problem.get("input")
            # text as the command line shows it ('warm'); other values as JSON spells them
            got = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
            return (f"argument --{name.replace('_', '-')}: expected {words}, got "
                    f"{got if len(got) <= 60 else got[:57] + '...'}")
    return f"argument --{name.replace('_', '-')}: {problem.get('msg', 'invalid')}"


def check_port(port: int) -> None:
    if not 0 <= port < 65536:
        raise UserError(f"--port must be in [0, 65535] (0 = any free port), got {port}")


def open_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a UserError saying why not."""
    check_port(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)  # from here connections wait for the server, not fail
    except (socket.gaierror, UnicodeError, TypeError, ValueError):  # no such name, or no name
        sock.close()
        raise UserError(f"--host {host!r} is not an address of this machine; pass "
                        f"{LOOPBACK} or 0.0.0.0") from None
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            other = f"{port + 1}" if port < 65535 else "0 (any free port)"
            raise UserError(f"port {port} is in use; pass another with --port, e.g. "
                            f"--port {other}") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}; pass another "
                        "--host or --port") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_loaded", "max_new_tokens", "max_score_chars"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, "
                            f"got {getattr(args, name)}")
    check_port(args.port)  # before a model loads, which can take a while
    cores = os.cpu_count() or 1
    if not 1 <= args.num_threads <= cores:
        raise UserError(f"--num-threads must be in [1, {cores}] on this machine (its CPU "
                        f"cores), got {args.num_threads}")
    catalog = RunCatalog(args.runs_dir)
    if not catalog.has_runs():
        raise UserError(f"runs folder {args.runs_dir} does not exist; train a run with python "
                        "train.py, or pass --runs-dir")
    if not catalog.summaries():
        raise UserError(f"no runs in {args.runs_dir}/ with an export or a checkpoint; train "
                        "one with python train.py")
    device = resolve_device(args.device)
    torch.set_num_threads(args.num_threads)
    cache = ModelCache(catalog, device, args.max_loaded)
    # a run that cannot be served is refused before listening
    first = cache.get(run_name(args.run, args.runs_dir), args.checkpoint)
    limits = Limits(args.max_new_tokens, args.max_score_chars)
    with open_socket(args.host, args.port) as sock:
        app = create_app(catalog, cache, limits, first.run_id, first.checkpoint)
        if not is_loopback(args.host):
            console.warn(f"listening on {args.host}: anyone who can reach this machine can use "
                         "the page and its API")
        shown_host = ("localhost" if args.host in (LOOPBACK, "0.0.0.0") else
                      f"[{args.host}]" if ":" in args.host else args.host)
        print(f"serving {first.run_id} ({first.checkpoint}) and the runs in {args.runs_dir}/ at "
              f"http://{shown_host}:{sock.getsockname()[1]}/ (Ctrl-C stops)", flush=True)
        serve_forever(app, sock)
    return 0


def run_name(run: str, runs_dir: Path) -> str:
    """--run as the API names runs: a folder path inside runs_dir (runs/<id>, as inference.py
    takes it) becomes its name."""
    path = Path(run)
    if len(path.parts) > 1 and path.parent.resolve() == runs_dir.resolve():
        return path.name
    return run


class Server(uvicorn.Server):
    """uvicorn's server, which at Ctrl-C (or SIGTERM) also tells the generations streaming
    to end: uvicorn waits for open responses before it stops."""

    def __init__(self, config: uvicorn.Config, generations: ActiveGenerations) -> None:
        super().__init__(config)
        self.generations = generations

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.generations.stopping.set()
        super().handle_exit(sig, frame)


def serve_forever(app: FastAPI, sock: socket.socket) -> None:
    """Serve on the bound socket until Ctrl-C (or SIGTERM)."""
    # a stream that does not end by itself (a client that reads nothing) is cut after this;
    # the app has no start-up or shut-down work, and without a lifespan task a second Ctrl-C
    # ends the server at once without a traceback
    config = uvicorn.Config(app, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS)
    try:
        Server(config, app.state.generations).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then passes Ctrl-C on
        pass
    console.info("stopped")


def main(argv: Sequence[str] | None = None) -> int:
    return console.run_main(serve, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())

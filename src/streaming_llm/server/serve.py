"""`streaming-llm serve`: an OpenAI-compatible HTTP server with persistent, endless sessions.

Binds to 127.0.0.1 by default. Binding anything but loopback requires an API key (`--api-key` or
the STREAMING_LLM_API_KEY environment variable); without one the command refuses to start, before
any model is loaded. Sessions are stored in SQLite under `--data-dir` (or `--store`: an SQLite
file or a Redis server shared by several replicas); the store is checked before the model loads,
so a bad data directory is a one-line error and exit status 2. SIGTERM and SIGINT shut down
cleanly: stop accepting, let in-flight replies finish for `--shutdown-grace` seconds, abort the
rest (rolled back), close the store, exit 0. See docs/server.md.
This module wires flags to the app; it does not handle requests itself.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal

from ..core.sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from ..errors import UserError
from .store import DEFAULT_MAX_DELTAS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_SESSIONS = 16
DEFAULT_MAX_BATCH = 16  # replies in one forward; each takes a batch row (one bounded cache) while it runs
DEFAULT_MAX_TOKENS_LIMIT = 2048
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_BYTES = 1 << 20
API_KEY_ENV = "STREAMING_LLM_API_KEY"
SNAPSHOT_DTYPES = ("model", "bfloat16", "float16", "float32")
DEFAULT_SHUTDOWN_GRACE_S = 5.0
DEFAULT_LEASE_MS = 10_000


def default_data_dir() -> str:
    from platformdirs import user_data_dir

    return os.path.join(user_data_dir("streaming-llm"), "server")


def add_arguments(p) -> None:
    from ..cliargs import add_model_arguments

    add_model_arguments(p, quant_default="auto")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (non-loopback needs --api-key)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", default=None, help=f"required bearer token (default: ${API_KEY_ENV})")
    p.add_argument("--data-dir", default=None, help="where sessions are stored (SQLite); 'none' keeps them in memory only")
    p.add_argument("--store", default=None,
                   help="session store: sqlite:PATH (a database file), redis://HOST:PORT/DB (shared by replicas) "
                        "or memory (default: sessions.sqlite3 in --data-dir)")
    p.add_argument("--session-ttl", type=float, default=None,
                   help="delete stored sessions not used for this many seconds (default: never)")
    p.add_argument("--max-stored-sessions", type=int, default=None,
                   help="keep at most this many stored sessions; the least recently used are deleted first")
    p.add_argument("--lease-ms", type=int, default=DEFAULT_LEASE_MS,
                   help="Redis store: a replica's claim on a session while a turn runs (renewed; expires if it dies)")
    p.add_argument("--shutdown-grace", type=float, default=DEFAULT_SHUTDOWN_GRACE_S,
                   help="on SIGTERM/SIGINT, seconds in-flight replies may take to finish before they are aborted")
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, help="sessions kept in memory (the rest on disk)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="replies decoded together in one forward (continuous batching; 1: one at a time)")
    p.add_argument("--ride-chunks", action="store_true",
                   help="a new prompt's chunk rides in the decoding rows' forward (vLLM's chunked prefill) instead "
                   "of a forward of its own right after it (docs/server.md, Scheduling)")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT, help="largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="max_tokens when a request gives none")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body accepted")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="when a request gives none (0: greedy)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="when a request gives none")
    p.add_argument("--snapshot-dtype", default="model", choices=SNAPSHOT_DTYPES,
                   help="dtype of stored streaming state: model (exact) or bfloat16 (half the size of float32)")
    p.add_argument("--max-snapshot-deltas", type=int, default=DEFAULT_MAX_DELTAS,
                   help="per-turn snapshot deltas stored before a full snapshot (0: every turn stored whole; "
                        "see docs/server.md, Persistence)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the model (default: the thread policy at load, models/threads.py)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def resolve_api_key(host: str, api_key: str | None) -> str | None:
    """The key to enforce (None: open). Raises UserError for non-loopback binds without one."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    key = key.strip() if key else None
    if not key and not is_loopback(host):
        raise UserError(
            f"refusing to bind {host}: it is not a loopback address, and no API key is set. "
            f"Pass --api-key KEY or set {API_KEY_ENV} (clients then send 'Authorization: Bearer KEY'), "
            f"or bind 127.0.0.1."
        )
    return key or None


def check_args(args) -> None:
    for flag in ("max_sessions", "max_batch", "max_tokens_limit", "default_max_tokens", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.max_snapshot_deltas < 0:
        raise UserError(f"--max-snapshot-deltas must be >= 0 (got {args.max_snapshot_deltas})")
    for flag in ("session_ttl", "max_stored_sessions"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
    if args.lease_ms < 100 or args.shutdown_grace < 0:
        raise UserError("--lease-ms must be >= 100 and --shutdown-grace >= 0")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1 (got {args.threads})")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535 (got {args.port})")


def build(model, tokenizer, config, *, model_name: str, data_dir, api_key=None, max_sessions=DEFAULT_MAX_SESSIONS,
          max_tokens_limit=DEFAULT_MAX_TOKENS_LIMIT, default_max_tokens=DEFAULT_MAX_TOKENS,
          max_body_bytes=DEFAULT_MAX_BODY_BYTES, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P, snapshot_dtype="model",
          store=None, session_ttl=None, max_stored_sessions=None, lease_ms=DEFAULT_LEASE_MS, max_batch=DEFAULT_MAX_BATCH,
          max_snapshot_deltas=DEFAULT_MAX_DELTAS, ride_chunks: bool | None = None):
    """The app and its session manager for a loaded model (used by `run` and by the tests).
    `store`: an open SessionStore (default: the SQLite store in `data_dir`); `ride_chunks`: None
    for the scheduler's default (`scheduler.DEFAULT_RIDE_CHUNKS`)."""
    import torch

    from .app import Settings, create_app
    from .conversations import chat_factory
    from .sessions import SessionManager
    from .snapshots import DeltaPolicy
    from .store import open_store

    dtype = None if snapshot_dtype == "model" else getattr(torch, snapshot_dtype)
    store = open_store(data_dir) if store is None else store
    cls = SessionManager
    if getattr(store, "shared", False):  # several replicas: leases and freshness checks
        from .replicas import SharedSessionManager as cls
    manager = cls(model, tokenizer, config, model_name, store, max_sessions, dtype,
                  chat_factory(model, tokenizer, config), session_ttl, max_stored_sessions,
                  max_batch=max_batch, **({} if ride_chunks is None else {"ride_chunks": ride_chunks}),
                  deltas=DeltaPolicy(enabled=max_snapshot_deltas > 0, max_deltas=max_snapshot_deltas))
    if getattr(store, "shared", False):
        manager.lease_ms = lease_ms
    settings = Settings(model_name, api_key, max_tokens_limit, min(default_max_tokens, max_tokens_limit),
                        max_body_bytes, temperature, top_p)
    return create_app(manager, settings), manager


def open_checked_store(args):
    """The session store, validated: a one-line UserError (exit 2) for an unusable one, in well
    under a second and before any model is loaded."""
    from .store import check_sqlite, open_store_url, parse_store_url

    data_dir = args.data_dir if args.data_dir is not None else (default_data_dir() if args.store is None else None)
    kind, target = parse_store_url(args.store, data_dir)
    if kind == "sqlite":
        check_sqlite(target)
    try:
        return open_store_url(kind, target), kind, target
    except UserError:
        raise
    except Exception as e:  # sqlite3 / redis errors: the environment, not a bug
        raise UserError(f"cannot open the session store {target}: {e}") from None


def _make_server(config):
    """A uvicorn.Server that exits normally on SIGTERM/SIGINT (uvicorn re-raises the signal after
    its graceful shutdown, which kills the process before the store is closed). A second signal
    forces the exit."""
    import uvicorn

    class Server(uvicorn.Server):
        signalled = None

        def handle_exit(self, sig, frame):
            self.signalled = signal.Signals(sig).name
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    return Server(config)


def _interrupt(sig, frame):
    raise KeyboardInterrupt(signal.Signals(sig).name)


def run(args) -> int:
    check_args(args)
    api_key = resolve_api_key(args.host, args.api_key)  # before any model is loaded
    store, store_kind, store_target = open_checked_store(args)  # likewise
    signal.signal(signal.SIGTERM, _interrupt)  # while the model loads: unwind, so the store is closed
    try:
        return _serve(args, api_key, store, store_kind, store_target)
    finally:
        store.close()  # idempotent: the manager closed it already on a normal exit


def _serve(args, api_key, store, store_kind, store_target) -> int:
    from ..cliargs import config_from_args, load_model_from_args
    from ..models import threads

    config = config_from_args(args)
    import uvicorn

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # loaded on a thread that exits, and this thread runs torch single-threaded from here on, so the
    # one thread that decodes holds the process's only OpenMP team (models/threads.py: with two,
    # every decode step ran about 2x slower)
    model, tokenizer = threads.run_in_passing_thread(load_model_from_args, args)  # honours --quant
    threads.single_threaded()
    app, manager = build(
        model, tokenizer, config, model_name=args.served_model_name or args.model, data_dir=None, api_key=api_key,
        max_sessions=args.max_sessions, max_tokens_limit=args.max_tokens_limit,
        default_max_tokens=args.default_max_tokens, max_body_bytes=args.max_body_bytes,
        temperature=args.temperature, top_p=args.top_p, snapshot_dtype=args.snapshot_dtype, store=store,
        session_ttl=args.session_ttl, max_stored_sessions=args.max_stored_sessions, lease_ms=args.lease_ms,
        max_batch=args.max_batch, max_snapshot_deltas=args.max_snapshot_deltas, ride_chunks=args.ride_chunks or None,
    )
    where = {"memory": "memory only", "sqlite": store_target, "redis": store_target}[store_kind]
    print(f"serving {args.served_model_name or args.model} on http://{args.host}:{args.port} "
          f"(sessions: {where}; API key {'required' if api_key else 'off'})", flush=True)
    server = _make_server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                         timeout_graceful_shutdown=args.shutdown_grace))
    try:
        server.run()
    finally:
        manager.shutdown()  # waits for the model step and the store write in progress, closes the store
    if server.signalled:
        print(f"{server.signalled}: shut down cleanly ({manager.counters['turns']} turns, "
              f"{manager.counters['aborted']} aborted)", flush=True)
    return 0

"""The `atoll` command line: serve, models, token, status.

Commands that act on the box (models, token) open the state directory directly and
work whether or not the daemon runs; `status` asks the running daemon over HTTP.
Exit codes: 0 success, 1 the action failed (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import cli_security, config
from daemon.auth import list_tokens, revoke_token
from daemon.db import StateDB
from daemon.token_limits import create_limited_token
from runtime.errors import AtollError
from runtime.store import ModelStore
from sync import cli as sync_cli
from sync.health import DEFAULT_HEALTH_CHECKS, HealthCheck


def _state_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", help="state directory (default /var/lib/atoll; env ATOLL_STATE_DIR)")
    p.add_argument("--config", help="TOML settings file (its state_dir is used)")


def _settings(args: argparse.Namespace) -> config.Settings:
    ns = argparse.Namespace(config=getattr(args, "config", None), state_dir=getattr(args, "state_dir", None),
                            host=getattr(args, "host", None), port=getattr(args, "port", None))
    return config.load(ns)


def _box_settings(args: argparse.Namespace) -> sync_cli.BoxSettings:
    """The sync commands' settings from the one schema: flags > environment > --config file > defaults."""
    s = config.load(args)
    return sync_cli.BoxSettings(s.state_dir, s.sync_config(), _cli_health_checks(s))


def cmd_serve(args: argparse.Namespace) -> int:
    """atoll serve."""
    from daemon.serve import run

    run(config.load(args))
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    """atoll models add."""
    s = _settings(args)
    store = ModelStore(s.state_dir)
    v = store.add_file(args.file, family=args.family, task=args.task)
    db = StateDB(s.db_path)
    db.audit("local-admin", "model.add", family=v.family, digest=v.digest, size=v.size, source=str(args.file))
    print(f"added {args.file} to model {v.family!r} as sha256-{v.digest} ({v.size} bytes, {v.quantization})")
    print("restart the daemon to serve it (systemctl restart atoll)")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    """atoll models list."""
    s = _settings(args)
    fams = ModelStore(s.state_dir).families()
    if args.json:
        print(json.dumps({f: [v.to_json() for v in vs] for f, vs in fams.items()}, indent=2))
        return 0
    if not fams:
        print(f"no models in {s.state_dir}; add one with `atoll models add FILE.gguf`")
        return 0
    print(f"{'MODEL':<20} {'QUANT':<8} {'ARCH':<10} {'PARAMS':>8} {'LAYERS':>6} {'CTX':>6} {'CHAT':<5} "
          f"{'SIZE':>9}  {'DIGEST':<19} STATUS")
    for fam, variants in fams.items():
        for v in variants:
            i = v.info
            params = f"{i.parameter_count / 1e6:.0f}M" if i else "-"
            print(f"{fam:<20} {v.quantization:<8} {(i.architecture if i else '-'):<10} {params:>8} "
                  f"{(i.n_layers if i else '-')!s:>6} {(i.context_length if i else '-')!s:>6} "
                  f"{('yes' if i and i.has_chat_template else 'no'):<5} {v.size / 2**20:>7.1f}Mi  "
                  f"sha256-{v.digest[:12]} {'BROKEN: ' + v.broken if v.broken else 'ok'}")
    return 0


def cmd_models_plan(args: argparse.Namespace) -> int:
    """atoll models plan: which variant of each family would run now, and why the others do not."""
    from daemon.governance import make_source, placement_policy
    from hardware.governor import State
    from hardware.probe import Prober
    from runtime.placement import decide

    s = config.load(args)
    prober = Prober(make_source(s))
    snap = prober.read()
    prober.close()
    fams = {f: vs for f, vs in ModelStore(s.state_dir).families().items() if vs}
    decisions = decide(fams, snap, State[args.state.upper()], placement_policy(s))
    if args.json:
        print(json.dumps({"snapshot": snap.to_json(), "decisions": {f: d.to_json() for f, d in decisions.items()}},
                         indent=2, default=str))
        return 0
    avail = snap.ram_available_bytes
    print(f"available RAM {avail / 2**30:.2f} GiB, headroom {s.ram_headroom_mb} MiB, governor state {args.state}"
          if avail is not None else "available RAM unknown")
    for fam, d in decisions.items():
        what = f"{d.variant.quantization} at n_ctx {d.n_ctx}" if d.variant else "nothing"
        print(f"\n{fam}: runs {what} ({d.why})")
        for v in fams[fam]:
            if v.broken:
                print(f"- {v.digest[:12]} [{v.quantization}]: broken: {v.broken}")
        if d.plan:
            for line in d.plan.explain().splitlines()[1:]:
                print(f"  {line}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    """atoll token create."""
    db = StateDB(_settings(args).db_path)
    print(create_limited_token(db, args.name, args.role, "local-admin", args.expires_days, args.rate_per_minute,
                               args.daily_token_quota)[0])
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    """atoll token list."""
    rows = list_tokens(StateDB(_settings(args).db_path))
    print(f"{'NAME':<24} {'ROLE':<6} {'CREATED':<30} REVOKED")
    for r in rows:
        print(f"{r['name']:<24} {r['role']:<6} {r['created']:<30} {r['revoked'] or '-'}")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    """atoll token revoke."""
    revoke_token(StateDB(_settings(args).db_path), args.name)
    print(f"revoked {args.name}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """atoll status: ask the running daemon."""
    url = args.url or _settings(args).url()
    token = args.token or os.environ.get("ATOLL_TOKEN")
    if not token:
        print("atoll status needs an admin token: --token T or ATOLL_TOKEN "
              "(create one with `atoll token create --role admin --name NAME`)", file=sys.stderr)
        return 2
    if not url.startswith(("http://", "https://")):
        print(f"atoll status: --url must be http:// or https://, not {url!r}", file=sys.stderr)
        return 2
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        f"{url.rstrip('/')}/admin/status", headers={"Authorization": f"Bearer {token}"})
    try:
        # the URL is the admin's own daemon, http(s) only; a self-signed cert is trusted from the box's own file
        with urllib.request.urlopen(req, timeout=10, context=cli_security.status_tls_context(  # noqa: S310
                _settings(args), url)) as resp:
            st: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as e:
        body = e.read().decode("utf-8", "replace")
        try:
            msg = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = body[:200]
        print(f"atoll status: {url} answered {e.code}: {msg}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"atoll status: cannot reach the daemon at {url}: {getattr(e, 'reason', e)} "
              f"(is it running? systemctl status atoll)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"atoll {st['version']} at {st['url']}: {'ready' if st['ready'] else 'NOT READY'}, "
          f"up {st['uptime_seconds']:.0f} s, daemon RSS {st['daemon_rss_bytes'] / 2**20:.0f} MiB")
    upd = st["updates"]
    cur = upd["current"]
    prog = upd["progress"]
    busy = prog.get("phase") not in (None, "idle", "done", "failed")
    print(f"release: {'sequence ' + str(cur['sequence']) + ' (' + cur['version'] + ')' if cur else 'none installed'}"
          + (f"; importing: {prog.get('phase')} {prog.get('files_done')}/{prog.get('files_total')} files, "
             f"{prog.get('bytes_done')}/{prog.get('bytes_total')} bytes" if busy else ""))
    if st.get("tls"):
        print(f"TLS certificate SHA-256 fingerprint: {st['tls']['fingerprint_sha256']}")
    gov = st["governor"]
    print(f"governor: {gov['state']} ({gov['reason']}){'' if gov['admitting'] else ', NOT admitting new requests'}")
    for m in st["models"]:
        extra = f" ({m['reason']})" if m.get("reason") else ""
        print(f"  {m['model']:<20} {m['state']:<10} {m['quantization']:<8} pid {m['worker_pid'] or '-':<8} "
              f"queued {m['queued']} restarts {m['restarts']}{extra}")
    return 0


def _cli_audit(state_dir: Path) -> Callable[[str, dict[str, Any]], None]:
    db = StateDB(state_dir / "atoll.db")

    def audit(event: str, detail: dict[str, Any]) -> None:
        outcome = "refused" if event.endswith(".rejected") else "failed" if event.endswith(".failed") else "ok"
        db.audit("local-admin", event, outcome, **detail)

    return audit


def _cli_health_checks(settings: config.Settings) -> tuple[HealthCheck, ...]:
    """The same checks the daemon runs (daemon.smoke): policy, headers, each model that fits loaded,
    with this box's threads, load timeout and sensors from the one settings schema."""
    from daemon.smoke import cli_health_check

    return (*DEFAULT_HEALTH_CHECKS, cli_health_check(settings))


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    ap = argparse.ArgumentParser(prog="atoll", description="atoll: offline LAN inference appliance daemon")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon (what the systemd unit starts)",
                       description="Run the daemon: load every model in the store and serve the API.")
    config.add_arguments(p)
    p.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="the model store").add_subparsers(dest="sub", required=True,
                                                                             metavar="ACTION")
    p = models.add_parser("add", help="copy a local GGUF file into the store",
                          description="Copy FILE.gguf into the store (hashed while copying) and list it "
                                      "as a variant of a model family. Audited.")
    p.add_argument("file", metavar="FILE.gguf")
    p.add_argument("--family", help="model name clients ask for (default: from the GGUF header)")
    p.add_argument("--task", choices=["generate", "embed"],
                   help="serve it for text generation or for /v1/embeddings (default: from the header)")
    _state_args(p)
    p.set_defaults(func=cmd_models_add)
    p = models.add_parser("list", help="list model families and variants with their GGUF facts")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _state_args(p)
    p.set_defaults(func=cmd_models_list)

    p = models.add_parser("plan", help="which variant of each model would run now, and why the others do not",
                          description="Read this machine's sensors (or --sensor-replay) and show, for each model "
                                      "family, the variant that fits the memory budget and why the others do not.")
    p.add_argument("--state", choices=["normal", "constrained", "critical"], default="normal",
                   help="plan as if the governor were in this state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    config.add_arguments(p)
    p.set_defaults(func=cmd_models_plan)

    tokens = sub.add_parser("token", help="API tokens").add_subparsers(dest="sub", required=True,
                                                                        metavar="ACTION")
    p = tokens.add_parser("create", help="create a token and print it (only this once) on stdout")
    p.add_argument("--role", choices=["user", "admin", "auditor"], required=True,
                   help="user: inference only; admin: everything; auditor: read-only audit log, usage, status")
    p.add_argument("--name", required=True, help="a unique name, e.g. the system that will use it")
    p.add_argument("--expires-days", type=int, metavar="N", help="the token stops working N days from now")
    p.add_argument("--rate-per-minute", type=int, metavar="N", help="requests per minute (over it: 429)")
    p.add_argument("--daily-token-quota", type=int, metavar="N",
                   help="prompt + completion tokens per UTC day (over it: 429)")
    _state_args(p)
    p.set_defaults(func=cmd_token_create)
    p = tokens.add_parser("list", help="list tokens (names, roles, dates; never secrets)")
    _state_args(p)
    p.set_defaults(func=cmd_token_list)
    p = tokens.add_parser("revoke", help="revoke a token by name; it stops working at once")
    p.add_argument("name")
    _state_args(p)
    p.set_defaults(func=cmd_token_revoke)

    sync_cli.register(sub, settings=_box_settings, audit_factory=_cli_audit)
    cli_security.register(sub, _settings, _state_args)

    p = sub.add_parser("status", help="ask the running daemon what it serves")
    p.add_argument("--url", help="daemon URL (default from settings: http://127.0.0.1:8080)")
    p.add_argument("--token", help="admin token (default: env ATOLL_TOKEN)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--port", help=argparse.SUPPRESS)
    _state_args(p)
    p.set_defaults(func=cmd_status)
    return ap


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `atoll` console script."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
    except AtollError as e:
        print(f"atoll: {e.message}", file=sys.stderr)
        code = 1
    sys.exit(code)

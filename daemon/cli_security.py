"""`atoll user`, `atoll audit`, `atoll tls`: on-box commands, with the daemon running or not.

They open the state DB directly (SQLite's lock serialises them with the daemon; the
audit chain takes the write lock around each append), so a user disabled here loses
every session at once: the daemon checks the session table on each request.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import accounts, audit, audit_verify, device_key, tls
from daemon.config import Settings
from daemon.db import StateDB
from runtime.errors import BadRequest

SettingsOf = Callable[[argparse.Namespace], Settings]


def _actor() -> accounts.Actor:
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = "unknown"
    return accounts.Actor(f"local:{who}", "console")


def _read_password(args: argparse.Namespace, prompt: str) -> str:
    if args.password_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline(accounts.MAX_PASSWORD_CHARS + 2)
        return line[:-1] if line.endswith("\n") else line
    pw = getpass.getpass(f"{prompt}: ")
    if getpass.getpass(f"{prompt} (again): ") != pw:
        raise BadRequest("the two passwords differ", param="password")
    return pw


def _new_hash(s: Settings, args: argparse.Namespace, prompt: str) -> str:
    pw = accounts.check_password(_read_password(args, prompt), s.password_min_length)
    return accounts.hash_password(pw)


def status_tls_context(s: Settings, url: str) -> ssl.SSLContext | None:
    """For `atoll status` over https: trust the system CAs plus the box's own (self-signed) certificate."""
    if not url.startswith("https://"):
        return None
    ctx = ssl.create_default_context()
    cert = Path(s.tls_cert) if s.tls_cert else tls.default_paths(s.state_dir)[0]
    if cert.is_file():
        with contextlib.suppress(ssl.SSLError, OSError):
            ctx.load_verify_locations(cafile=str(cert))
    return ctx


def register(sub: Any, settings_of: SettingsOf, state_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the user, audit and tls command groups to the `atoll` parser."""
    def db_of(args: argparse.Namespace) -> tuple[Settings, StateDB]:
        s = settings_of(args)
        return s, StateDB(s.db_path)

    def user_create(args: argparse.Namespace) -> int:
        s, db = db_of(args)
        name = accounts.check_username(args.name, "NAME")
        accounts.create_user(db.db.conn, name, _new_hash(s, args, "password"), args.role, _actor())
        print(f"created {args.role} {name}")
        return 0

    def user_list(args: argparse.Namespace) -> int:
        _, db = db_of(args)
        rows = accounts.list_users(db.db.conn)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'USERNAME':<24} {'ROLE':<8} {'STATE':<9} LAST LOGIN")
        for u in rows:
            state = "disabled" if u["disabled"] else "locked" if u["locked_until"] else "active"
            print(f"{u['username']:<24} {u['role']:<8} {state:<9} {u['last_login'] or '-'}")
        return 0

    def user_passwd(args: argparse.Namespace) -> int:
        s, db = db_of(args)
        accounts.set_password(db.db.conn, args.name, _new_hash(s, args, "new password"), _actor())
        print(f"password of {args.name} changed; its sessions ended")
        return 0

    def user_role(args: argparse.Namespace) -> int:
        _, db = db_of(args)
        accounts.set_role(db.db.conn, args.name, args.role, _actor())
        print(f"{args.name} is now {args.role}")
        return 0

    def user_disable(args: argparse.Namespace) -> int:
        _, db = db_of(args)
        accounts.set_disabled(db.db.conn, args.name, True, _actor())
        print(f"disabled {args.name}; its sessions ended")
        return 0

    def user_enable(args: argparse.Namespace) -> int:
        _, db = db_of(args)
        accounts.set_disabled(db.db.conn, args.name, False, _actor())
        print(f"enabled {args.name}")
        return 0

    def user_delete(args: argparse.Namespace) -> int:
        _, db = db_of(args)
        accounts.delete_user(db.db.conn, args.name, _actor())
        print(f"deleted {args.name}")
        return 0

    users = sub.add_parser("user", help="people's accounts").add_subparsers(dest="sub", required=True,
                                                                           metavar="ACTION")
    pw_help = "read the password from the first line of stdin instead of prompting"
    for name, func, hlp, extra in (
            ("create", user_create, "create an account (prompts for the password)", ("name", "role", "pw")),
            ("list", user_list, "list accounts", ("json",)),
            ("passwd", user_passwd, "set a new password (ends the user's sessions)", ("name", "pw")),
            ("role", user_role, "change a user's role (ends the user's sessions)", ("name", "role")),
            ("disable", user_disable, "disable an account; its sessions end at once", ("name",)),
            ("enable", user_enable, "enable an account again (also clears a lockout)", ("name",)),
            ("delete", user_delete, "delete an account", ("name",))):
        p = users.add_parser(name, help=hlp)
        if "name" in extra:
            p.add_argument("name", metavar="NAME")
        if "role" in extra:
            p.add_argument("--role", choices=accounts.ROLES, required=True,
                           help="user: inference; admin: everything; auditor: read-only audit, usage, status")
        if "pw" in extra:
            p.add_argument("--password-stdin", action="store_true", help=pw_help)
        if "json" in extra:
            p.add_argument("--json", action="store_true", help="machine-readable output")
        state_args(p)
        p.set_defaults(func=func)

    def audit_verify_cmd(args: argparse.Namespace) -> int:
        s, db = db_of(args)
        pub = (device_key.load_public(Path(args.key)) if args.key
               else device_key.ensure(s.state_dir).public_key())
        cp = None
        if args.checkpoint:
            try:
                text = Path(args.checkpoint).read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise BadRequest(f"cannot read checkpoint {args.checkpoint}: {e}", param="checkpoint") from None
            cp = audit_verify.parse(text, pub)
        v = audit_verify.verify(db.db.conn, pub, cp)
        if args.json:
            print(json.dumps(v.to_json(), indent=2))
        elif v.ok:
            extra = f"; it still holds the checkpoint's {cp.size} rows unchanged" if cp else ""
            print(f"audit log ok: rows {v.first_seq}..{v.size} verified, head {v.head}{extra}")
        else:
            print(f"audit log BROKEN: {v.problem}", file=sys.stderr)
        return 0 if v.ok else 1

    def audit_export_cmd(args: argparse.Namespace) -> int:
        s, db = db_of(args)
        since = args.since
        key = device_key.ensure(s.state_dir)
        out = audit_verify.export(db.db.conn, key, since, Path(args.out), _actor().name)
        print(f"exported {out['rows']} rows to {out['out']} (checkpoint size {out['checkpoint']['size']})")
        return 0

    def audit_checkpoint_cmd(args: argparse.Namespace) -> int:
        s, db = db_of(args)
        print(audit_verify.current_checkpoint(db.db.conn, device_key.ensure(s.state_dir)).text(), end="")
        return 0

    au = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(dest="sub", required=True,
                                                                                    metavar="ACTION")
    p = au.add_parser("verify", help="walk the hash chain; name the first broken row",
                      description="Walk the audit chain and name the first broken row. With --checkpoint, also "
                                  "prove the log still holds the checkpoint's rows unchanged (catches truncation).")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="a checkpoint saved earlier (export or GET /admin/audit/verify)")
    p.add_argument("--key", metavar="PEM", help="the device public key (default: the state dir's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    state_args(p)
    p.set_defaults(func=audit_verify_cmd)
    p = au.add_parser("export", help="write rows since T as JSON lines plus a fresh signed checkpoint")
    p.add_argument("--since", required=True, metavar="T", help="UTC time, e.g. 2026-01-01T00:00:00Z")
    p.add_argument("--out", required=True, metavar="DIR")
    state_args(p)
    p.set_defaults(func=audit_export_cmd)
    p = au.add_parser("checkpoint", help="print a fresh signed checkpoint of the log")
    state_args(p)
    p.set_defaults(func=audit_checkpoint_cmd)

    def tls_init(args: argparse.Namespace) -> int:
        s, db = db_of(args)
        cert, key = (Path(s.tls_cert) if s.tls_cert else tls.default_paths(s.state_dir)[0],
                     Path(s.tls_key) if s.tls_key else tls.default_paths(s.state_dir)[1])
        if cert.exists() and not args.force:
            raise BadRequest(f"{cert} exists; pass --force to replace it", param="force")
        info = tls.generate(cert, key, list(args.san))
        audit.append(db.db.conn, audit.Event("tls.cert_installed", principal=_actor().name, source="console",
                                             object=str(cert), detail={"fingerprint": info.fingerprint,
                                                                       "self_signed": True, "sans": info.sans}))
        print(f"wrote {cert} and {key} (mode 0600)\nSHA-256 fingerprint: {info.fingerprint}\n"
              f"names: {', '.join(info.sans)}\nturn HTTPS on with tls = true (or ATOLL_TLS=1) and restart atoll")
        return 0

    tl = sub.add_parser("tls", help="HTTPS certificate").add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = tl.add_parser("init", help="make a key and a self-signed certificate for this box")
    p.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="another name or address to put in the certificate (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing certificate")
    state_args(p)
    p.set_defaults(func=tls_init)

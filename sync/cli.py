"""The `atoll` subcommands for sync: keys, bundle, trust, import, rollback.

The daemon's CLI calls `register(subparsers, settings=...)`; every command stores
`func(args) -> int` in the namespace (exit status: 0 ok, 1 refused/failed, 2 usage).
Private keys are never printed.

Commands that act on a box (import, rollback, bundle verify, trust init --install) and
`bundle create` take their state directory, product, device class and health-check
timeout from the `settings` loader: the `atoll` CLI passes the daemon's one settings
schema, so `--config FILE`, `ATOLL_STATE_DIR`, `ATOLL_DEVICE_CLASS`… mean the same as for
`atoll serve` and the USB path. Flags given here override them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import AtollError
from sync.apply import Audit, SyncManager
from sync.builder import check_bundle, create_bundle, newest_root, sign_bundle
from sync.errors import TrustError
from sync.fsutil import atomic_write, canonical_json, pretty_json
from sync.health import DEFAULT_HEALTH_CHECKS, HealthCheck
from sync.keys import generate_key, load_public_key, load_signing_key
from sync.roots import MAX_ROOT_BYTES, check_self_signed, new_root_document, parse_root, sign_root_document
from sync.signatures import require_threshold
from sync.verify import SyncConfig

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/atoll")
AuditFactory = Callable[[Path], Audit]


@dataclass(frozen=True)
class BoxSettings:
    """What the sync commands need from the settings: the state directory and this box's sync config."""

    state_dir: Path
    sync: SyncConfig
    #: the checks a release must pass before `atoll import`/`rollback` switch to it; None: the
    #: checks given to register() (atoll's CLI builds them from the same settings)
    health_checks: Sequence[HealthCheck] | None = None


SettingsLoader = Callable[[argparse.Namespace], BoxSettings]


def flag_settings(args: argparse.Namespace) -> BoxSettings:
    """Settings from this parser's flags alone (stand-alone `atoll-sync`; `atoll` passes its full schema)."""
    kw = {k: v for k in ("product", "device_class", "health_timeout") if (v := getattr(args, k, None)) is not None}
    return BoxSettings(Path(getattr(args, "state_dir", None) or DEFAULT_STATE_DIR), SyncConfig(**kw))


def parse_expiry(value: str) -> float:
    """'90d' (days from now), '2027-01-31' or '2027-01-31T00:00:00Z' -> epoch seconds."""
    if value.endswith("d") and value[:-1].isdigit():
        return time.time() + int(value[:-1]) * 86400
    try:
        t = dt.datetime.fromisoformat(value.removesuffix("Z"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected e.g. 90d or 2027-01-31, got {value!r}") from e
    return (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).timestamp()


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS,
                   help=f"the box's state directory (default {DEFAULT_STATE_DIR}; env ATOLL_STATE_DIR)")
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE",
                   help="TOML settings file, the same as `atoll serve --config` (env ATOLL_CONFIG)")


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except AtollError as e:
            print(f"atoll: {e.message} [{e.code}]", file=sys.stderr)
            return 1
        except (OSError, ValueError) as e:
            print(f"atoll: {e}", file=sys.stderr)
            return 1
    return run


# -- keys --------------------------------------------------------------------------------------

def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Write NAME.key (0600) and NAME.pub.json; print the key id and public file."""
    pub = generate_key(args.out, args.name)
    _print({"keyid": pub.keyid, "public_key_file": str(args.out / f"{args.name}.pub.json"),
            "private_key_file": str(args.out / f"{args.name}.key")})
    return 0


# -- bundle ------------------------------------------------------------------------------------

def _root_version(args: argparse.Namespace) -> int:
    """--root-version, else the version of --root (the newest root document there), else --root-chain's newest."""
    if args.root_version is not None:
        return int(args.root_version)
    if args.root is not None:
        return newest_root(args.root).version
    if args.root_chain:
        return 1  # create_bundle raises it to the newest root of the chain
    raise TrustError("say which trust root the signers belong to: --root FILE_OR_DIR (the newest "
                     "<N>.root.json there is used, e.g. the directory trust init/rotate wrote to) "
                     "or --root-version N")


def cmd_bundle_create(args: argparse.Namespace, settings: SettingsLoader) -> int:
    """Build an unsigned bundle directory from local GGUF files and a policy."""
    product = args.product or settings(args).sync.product
    models: dict[str, list[Path]] = {}
    for spec in args.model:
        fam, sep, file = spec.partition("=")
        if not sep or not fam or not file:
            raise TrustError(f"--model takes FAMILY=FILE.gguf, got {spec!r}")
        models.setdefault(fam, []).append(Path(file))
    m = create_bundle(args.out, models=models, policy=args.policy, sequence=args.sequence,
                      expires=args.expires, version=args.version, product=product,
                      compatible=tuple(args.compatible or ["*"]), min_daemon_version=args.min_daemon_version,
                      root_version=_root_version(args), root_chain=tuple(args.root_chain or ()))
    _print({"out": str(args.out), "sequence": m.sequence, "bundle_digest": m.digest, "files": len(m.files),
            "bytes": m.total_size, "root_version": m.root_version, "product": m.product, "signed": False})
    return 0


def cmd_bundle_sign(args: argparse.Namespace) -> int:
    """Add one signature per --key over the exact bytes of bundle.json."""
    signers: list[str] = []
    for k in args.key:
        signers = sign_bundle(args.dir, load_signing_key(k))
    _print({"signed_by": signers})
    return 0


def cmd_bundle_verify(args: argparse.Namespace, settings: SettingsLoader) -> int:
    """Run every check the box runs (same code), hashing every blob it would copy; install nothing."""
    box = settings(args)
    sd = box.state_dir if args.root is None else None
    rep = check_bundle(args.dir, root_path=args.root, state_dir=sd, config=box.sync)
    _print({"ok": True, **rep.__dict__})
    return 0


# -- trust -------------------------------------------------------------------------------------

def _root_from_args(args: argparse.Namespace, version: int) -> dict[str, Any]:
    rk = [load_public_key(p) for p in args.root_key]
    bk = [load_public_key(p) for p in args.bundle_key]
    doc = new_root_document(version, args.expires, rk + bk,
                            {"root": ([k.keyid for k in rk], args.root_threshold),
                             "bundle": ([k.keyid for k in bk], args.bundle_threshold)},
                            reset_floors=getattr(args, "reset_floors", False))
    for kp in args.sign or ():
        sign_root_document(doc, load_signing_key(kp))
    return doc


def _install_root(state_dir: Path, raw: bytes, force: bool) -> None:
    root = parse_root(raw)
    check_self_signed(root)
    dest = state_dir / "trust" / "root.json"
    if dest.exists() and not force:
        raise TrustError(f"{dest} exists; roots rotate through signed bundles (--force re-provisions)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, raw)


def cmd_trust_init(args: argparse.Namespace, settings: SettingsLoader) -> int:
    """Create root v1 (--out) from public keys, and/or install a root on a box (--install)."""
    if args.from_file:
        raw = args.from_file.read_bytes()[: MAX_ROOT_BYTES + 1]
    else:
        if not (args.root_key and args.bundle_key and args.expires):
            raise TrustError("give --root-key, --bundle-key and --expires (or --from FILE)")
        raw = pretty_json(_root_from_args(args, 1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, raw)
    if args.install:
        _install_root(settings(args).state_dir, raw, args.force)
    root = parse_root(raw)
    _print({"version": root.version, "keys": sorted(root.keys), "out": str(args.out) if args.out else None,
            "installed": bool(args.install)})
    return 0


def cmd_trust_rotate(args: argparse.Namespace) -> int:
    """Write root N+1 for new keys, signed by --sign keys; report whether old and new thresholds are met."""
    old = parse_root(args.from_file.read_bytes())
    doc = _root_from_args(args, old.version + 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, pretty_json(doc))
    new = parse_root(canonical_json(doc))
    status = {}
    for label, r in (("old", old), ("new", new)):
        try:
            require_threshold(new.signatures, new.signed_bytes, r.keys, r.roles["root"], what=label)
            status[label] = "threshold met"
        except AtollError as e:
            status[label] = e.message
    _print({"version": new.version, "out": str(args.out), "signatures": status,
            "reset_floors": new.reset_floors,
            "next": f"copy to the bundle with `bundle create --root-chain {args.out}`"})
    return 0


def cmd_trust_sign(args: argparse.Namespace) -> int:
    """Add signatures to a root document (each root-key holder signs on their own machine)."""
    doc = json.loads(args.file.read_text())
    for kp in args.key:
        sign_root_document(doc, load_signing_key(kp))
    parse_root(canonical_json(doc))
    atomic_write(args.file, pretty_json(doc))
    _print({"signed_by": [s["keyid"] for s in doc["signatures"]]})
    return 0


# -- on the box --------------------------------------------------------------------------------

def _manager(args: argparse.Namespace, settings: SettingsLoader, audit_factory: AuditFactory | None,
             health_checks: Sequence[HealthCheck]) -> SyncManager:
    box = settings(args)
    sd, cfg = box.state_dir, box.sync

    def show(p: Any) -> None:
        if not args.quiet:
            print(f"\r{p.phase:<12} {p.files_done}/{p.files_total} files "
                  f"{p.bytes_done >> 20}/{p.bytes_total >> 20} MiB", end="", file=sys.stderr, flush=True)

    mgr = SyncManager(sd, cfg, audit=audit_factory(sd) if audit_factory else None, on_progress=show,
                      health_checks=box.health_checks if box.health_checks is not None else health_checks)
    mgr.recover()
    return mgr


def cmd_import(settings: SettingsLoader, audit_factory: AuditFactory | None,
               health_checks: Sequence[HealthCheck]) -> Callable[[argparse.Namespace], int]:
    """`atoll import PATH`: verify and apply a bundle from a directory or a .tar file."""
    def run(args: argparse.Namespace) -> int:
        mgr = _manager(args, settings, audit_factory, health_checks)
        p = Path(args.path)
        coro = mgr.import_tar(p) if p.is_file() and p.name != "bundle.json" else mgr.import_bundle(p)
        res = asyncio.run(coro)
        print(file=sys.stderr)
        _print(res.to_json())
        return 0
    return run


def cmd_rollback(settings: SettingsLoader, audit_factory: AuditFactory | None,
                 health_checks: Sequence[HealthCheck]) -> Callable[[argparse.Namespace], int]:
    """`atoll rollback`: return to the previous release."""
    def run(args: argparse.Namespace) -> int:
        rel = asyncio.run(_manager(args, settings, audit_factory, health_checks).rollback())
        _print({"current": rel.sequence, "version": rel.version})
        return 0
    return run


def _box_opts(p: argparse.ArgumentParser) -> None:
    _add_state_dir(p)
    p.add_argument("--product", help="product name bundles must target (setting product; default atoll)")
    p.add_argument("--device-class",
                   help="this box's class, matched against `compatible` (setting device_class; default generic)")
    p.add_argument("--health-timeout", type=float,
                   help="seconds the health check of a new release may take (setting health_timeout; default 120)")


def _root_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root-key", type=Path, action="append", default=[], help="public key file (repeat)")
    p.add_argument("--root-threshold", type=int, default=1, help="root keys needed to sign a root")
    p.add_argument("--bundle-key", type=Path, action="append", default=[], help="public key file (repeat)")
    p.add_argument("--bundle-threshold", type=int, default=1, help="bundle keys needed to sign a bundle")
    p.add_argument("--expires", type=parse_expiry, help="root expiry: 365d or 2028-01-01")
    p.add_argument("--sign", type=Path, action="append", help="private key file to sign with (repeat)")


def register(subparsers: Any, *, settings: SettingsLoader = flag_settings,
             audit_factory: AuditFactory | None = None,
             health_checks: Sequence[HealthCheck] = DEFAULT_HEALTH_CHECKS) -> None:
    """Add keys/bundle/trust/import/rollback to the `atoll` argparse subparsers.

    settings(args) resolves the state dir and the box's sync config (flags over the
    settings file and environment); audit_factory(state_dir) returns the audit hook for
    on-box commands; health_checks are run on a release before `atoll import` switches to it.
    """
    def with_settings(fn: Callable[[argparse.Namespace, SettingsLoader], int]) -> Callable[[argparse.Namespace], int]:
        return _guard(lambda args: fn(args, settings))

    keys = subparsers.add_parser("keys", help="signing keys").add_subparsers(dest="keys_cmd", required=True)
    p = keys.add_parser("generate", help="generate an Ed25519 key pair (private key 0600, never printed)")
    p.add_argument("name", help="file name stem: NAME.key and NAME.pub.json")
    p.add_argument("--out", type=Path, default=Path("."), help="directory for the key files")
    p.set_defaults(func=_guard(cmd_keys_generate))

    bundle = subparsers.add_parser("bundle", help="build, sign, verify update bundles").add_subparsers(
        dest="bundle_cmd", required=True)
    p = bundle.add_parser("create", help="build an unsigned bundle directory (copy DIR/ATOLL to a stick)")
    p.add_argument("--model", action="append", required=True, metavar="FAMILY=FILE.gguf",
                   help="a model variant (repeat; several files per family allowed)")
    p.add_argument("--policy", type=Path, required=True, help="policy TOML file")
    p.add_argument("--sequence", type=int, required=True, help="strictly increasing bundle number")
    p.add_argument("--expires", type=parse_expiry, required=True, help="90d or 2027-01-31")
    p.add_argument("--version", help="display version (default: the sequence)")
    p.add_argument("--product", help="target product (default: the product setting, atoll)")
    p.add_argument("--compatible", action="append", help="device class (repeat; default '*')")
    p.add_argument("--min-daemon-version", default="0.1.0", help="oldest atoll that may install it")
    p.add_argument("--root", type=Path, metavar="FILE_OR_DIR",
                   help="the admin's trust root: a root document, or a directory whose newest N.root.json "
                        "is used; the bundle names its version")
    p.add_argument("--root-version", type=int, help="root version the signers belong to (instead of --root)")
    p.add_argument("--root-chain", type=Path, action="append", help="N.root.json to carry (repeat)")
    p.add_argument("--out", type=Path, required=True, help="output directory (gets ATOLL/)")
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="FILE", help="TOML settings file")
    p.set_defaults(func=with_settings(cmd_bundle_create))
    p = bundle.add_parser("sign", help="add signatures over bundle.json (k-of-n: each signer runs this)")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--key", type=Path, action="append", required=True, help="private key file (repeat)")
    p.set_defaults(func=_guard(cmd_bundle_sign))
    p = bundle.add_parser("verify", help="check a bundle as a box would, hashing every blob")
    p.add_argument("dir", type=Path, help="bundle directory")
    p.add_argument("--root", type=Path, help="trusted root document (else the box's, via --state-dir)")
    _box_opts(p)
    p.set_defaults(func=with_settings(cmd_bundle_verify))

    trust = subparsers.add_parser("trust", help="trust roots").add_subparsers(dest="trust_cmd", required=True)
    p = trust.add_parser("init", help="create root v1 and/or install a root on a box (provisioning)")
    _root_opts(p)
    p.add_argument("--from", dest="from_file", type=Path, help="use this existing root document")
    p.add_argument("--out", type=Path, help="write the root document here")
    p.add_argument("--install", action="store_true", help="install it as the box's trust/root.json")
    p.add_argument("--force", action="store_true", help="replace an installed root (re-provisioning)")
    _add_state_dir(p)
    p.set_defaults(func=with_settings(cmd_trust_init))
    p = trust.add_parser("rotate", help="write root N+1 (needs old and new root thresholds of signatures)")
    _root_opts(p)
    p.add_argument("--from", dest="from_file", type=Path, required=True, help="the current root N")
    p.add_argument("--out", type=Path, required=True, help="where to write N+1.root.json")
    p.add_argument("--reset-floors", action="store_true",
                   help="boxes adopting this root restart their sequence and time floors (recovers from a "
                        "bundle signed with a huge sequence or a far-future date; see FORMAT.md)")
    p.set_defaults(func=_guard(cmd_trust_rotate))
    p = trust.add_parser("sign", help="add signatures to a root document")
    p.add_argument("file", type=Path)
    p.add_argument("--key", type=Path, action="append", required=True, help="private key file (repeat)")
    p.set_defaults(func=_guard(cmd_trust_sign))

    p = subparsers.add_parser("import", help="verify and apply a bundle (directory or .tar) on this box")
    p.add_argument("path", help="stick mount point, ATOLL dir, bundle.json or a .tar file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    _box_opts(p)
    p.set_defaults(func=_guard(cmd_import(settings, audit_factory, health_checks)))
    p = subparsers.add_parser("rollback", help="return to the previous release")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    _box_opts(p)
    p.set_defaults(func=_guard(cmd_rollback(settings, audit_factory, health_checks)))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (the daemon's CLI normally hosts these commands)."""
    parser = argparse.ArgumentParser(prog="atoll-sync")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

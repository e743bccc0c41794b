"""Getting updates in: signed bundles, trust roots, verification, staging, apply and rollback.

For the daemon (see sync/FORMAT.md for the format itself):

    from sync.apply import SyncManager, ImportResult
    from sync.verify import SyncConfig
    from sync.health import DEFAULT_HEALTH_CHECKS
    from sync.state import read_current_release, Release
    from sync.watch import UsbWatcher
    from sync.policy import Policy, load_policy

    mgr = SyncManager(state_dir, SyncConfig(...), audit=audit_log.record,
                      health_checks=(*DEFAULT_HEALTH_CHECKS, smoke_test))
    mgr.recover()                               # at start-up, before serving
    await mgr.import_bundle(path) / import_tar(path) -> ImportResult
    await mgr.rollback() -> Release
    mgr.progress.snapshot()                     # phase, bytes, files
    read_current_release(state_dir).families    # family -> [{digest, size, quant, ctx, ...}]
    watcher = UsbWatcher(mgr.import_bundle, media_dirs); await watcher.start() / stop()
"""

"""Getting updates in: signed bundles, trust roots, verification, staging, apply and rollback."""

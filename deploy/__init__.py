"""Field updates: reproducible bundles, a signed TUF repository, atomic installs with self-rollback.

- :mod:`~smearsight.deploy.bundle`: build, unpack safely, verify and smoke-test release bundles.
- :mod:`~smearsight.deploy.repository` / :mod:`~smearsight.deploy.keys`: the TUF repository (init,
  publish per GPU key or ONNX fallback, refresh, serve over HTTP).
- :mod:`~smearsight.deploy.updater`: the device's TUF client (online or a USB directory).
- :mod:`~smearsight.deploy.install`: releases, atomic ``current`` switch, rollback, state and event log.
- :mod:`~smearsight.deploy.health`: health checks that roll back a bad new release by themselves.
- :mod:`~smearsight.deploy.sdnotify`: systemd readiness and watchdog pings.
- :mod:`~smearsight.deploy.systemd`: the unit files and udev rules.

The operator's guide is docs/deploy.md.
"""

"""Start-up for ``twistd -n mta``: load the configuration, explain problems, build the service.

A bad configuration ends start-up with one line naming the key and the
problem, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mta.config import ConfigError, load_config


def fail(message: str) -> None:
    sys.stderr.write(f"mta: {message}\n")
    raise SystemExit(1)


def make_service(config_path: Path | None, overrides: dict[str, Any]) -> Any:
    from mta.daemon.logs import install_scrubber
    from mta.daemon.service import MTAService, StartupError

    # Before twistd begins logging, so the secret filter runs ahead of its observer.
    install_scrubber()

    try:
        config = load_config(config_path, overrides)
    except ConfigError as e:
        fail(f"configuration error: {e}")
    notes: list[str] = []
    if config_path is None:
        from mta.daemon.demo import prepare_demo

        config.data_dir.mkdir(parents=True, exist_ok=True)
        notes = prepare_demo(config)
    try:
        service = MTAService(config, config_path=config_path, overrides=overrides,
                             install_signals=True)
    except (StartupError, ConfigError) as e:  # ConfigError: a check's factory cannot be loaded
        fail(str(e))
    for note in notes:
        sys.stderr.write(f"mta: {note}\n")
    if config_path is None:
        sys.stderr.write(
            "mta: demo configuration: MX on 127.0.0.1:2525, submission on 2587 (STARTTLS) "
            "and 2465 (TLS).\n"
            "mta: try: swaks --server 127.0.0.1:2525 --to demo@demo.test\n"
            "mta: mail for demo@demo.test lands in var/mail/demo.test/demo/new/\n"
        )
    return service

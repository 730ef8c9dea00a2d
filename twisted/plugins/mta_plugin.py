"""The ``twistd mta`` plugin: parses options and hands them to :mod:`mta.daemon.service`.

Nothing here imports the reactor; the service is built when twistd asks for it.
"""

from __future__ import annotations

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the mail transfer agent. Without --config an embedded demo configuration "
        "is used: ports 2525/2587/2465 on 127.0.0.1 and everything under ./var/."
    )
    optParameters = [
        ["config", "c", None, "Path of the TOML configuration file."],
        ["queue", None, None, "Queue directory (overrides queue_dir)."],
        ["mx-port", None, None, "TCP port used to contact MX hosts (tests, benchmarks)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = {}
        self["smarthost"] = []
        self["dns"] = []

    def opt_listen(self, value: str) -> None:
        """NAME=ENDPOINT: override a listener's endpoint, e.g. mx=tcp:2525 (repeatable)."""
        name, sep, endpoint = value.partition("=")
        if not sep or not name or not endpoint:
            raise usage.UsageError("--listen takes NAME=ENDPOINT, e.g. mx=tcp:2525")
        self["listen"][name] = endpoint

    def opt_smarthost(self, value: str) -> None:
        """HOST:PORT: relay all outgoing mail through this host (repeatable)."""
        self["smarthost"].append(value)

    def opt_dns(self, value: str) -> None:
        """HOST:PORT: DNS server to use instead of /etc/resolv.conf (repeatable)."""
        self["dns"].append(value)

    def postOptions(self) -> None:  # noqa: N802
        if self["mx-port"] is not None:
            try:
                self["mx-port"] = int(self["mx-port"])
            except ValueError:
                raise usage.UsageError("--mx-port must be a number") from None


@implementer(IServiceMaker, IPlugin)
class MTAServiceMaker:
    tapname = "mta"
    description = "A durable, small mail transfer agent (SMTP server, queue and delivery)."
    options = Options

    def makeService(self, options: Options):  # noqa: N802
        from pathlib import Path

        from mta.daemon.startup import make_service

        return make_service(
            config_path=Path(options["config"]) if options["config"] else None,
            overrides={
                "listen": options["listen"],
                "queue_dir": options["queue"],
                "smarthosts": options["smarthost"],
                "dns_servers": options["dns"],
                "mx_port": options["mx-port"],
            },
        )


serviceMaker = MTAServiceMaker()

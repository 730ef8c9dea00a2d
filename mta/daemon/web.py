"""What the daemon's HTTP listeners share (the MTA-STS policy host, the status page)."""

from __future__ import annotations

from twisted.web.server import Request, Site


class QuietSite(Site):
    """A twisted.web site that writes no access-log line per request (so no
    request line, header or credential of a request ever reaches a log)."""

    noisy = False

    def log(self, request: Request) -> None:
        pass

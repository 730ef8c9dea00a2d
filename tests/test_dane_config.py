"""``[dane]`` and the DANE TLS policies in the configuration: checked at load."""

from __future__ import annotations

import pytest

from mta.config import ConfigError
from tests.harness import make_config


def test_dane_policy_needs_dane_enabled(tmp_path):
    with pytest.raises(ConfigError, match=r"delivery.tls_policy: dane needs \[dane\] enabled"):
        make_config(tmp_path, extra={"delivery": {"tls_policy": "dane"}})


def test_resolver_must_be_on_loopback(tmp_path):
    with pytest.raises(ConfigError, match=r"dane.resolvers\[0\]: 192.0.2.1 is not a loopback"):
        make_config(tmp_path, extra={"dane": {"enabled": True, "resolvers": ["192.0.2.1:53"]}})
    # Without dane.resolvers, dns.servers are the resolver and must be local too.
    with pytest.raises(ConfigError, match=r"dns.servers\[0\]: 192.0.2.1 is not a loopback"):
        make_config(tmp_path / "b", extra={"dane": {"enabled": True},
                                           "dns": {"servers": ["192.0.2.1:53"]}})


def test_dane_settings_load(tmp_path):
    config = make_config(tmp_path, extra={
        "dane": {"enabled": True, "resolvers": ["[::1]:5353"], "check_name": "example.",
                 "check_bogus": "bogus.example.", "recheck_interval": 30},
        "delivery": {"tls_policy": "dane-only"}})
    assert config.dane.resolvers == (("::1", 5353),)
    assert (config.dane.check_name, config.dane.check_bogus) == ("example.", "bogus.example.")
    assert config.dane.recheck_interval == 30.0
    assert config.delivery.tls_policy == "dane-only"


def test_unknown_key_and_bad_interval(tmp_path):
    with pytest.raises(ConfigError, match=r"dane\.resolver"):
        make_config(tmp_path, extra={"dane": {"resolver": "127.0.0.1:53"}})
    with pytest.raises(ConfigError, match=r"dane.recheck_interval"):
        make_config(tmp_path / "b", extra={"dane": {"recheck_interval": 0}})

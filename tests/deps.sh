#!/usr/bin/env bash
# What the test suite needs from the system, checked before `make test` runs it
# (and so before every CI run: .ci/run calls `make test`).
#
#   swaks (with Perl's TLS and SASL modules)   a real client: STARTTLS, AUTH
#   smtp-sink, smtp-source (Debian: postfix)   a real peer server for the client tests
#   unbound, nsd, ldns-keygen/ldns-signzone     DANE tests: a validating resolver in front of
#     (Debian: unbound, nsd, ldnsutils)         signed zones on loopback
#   chromium (headless)                         the status page's browser tests
#   python3's venv/ensurepip (python3-venv)    only while .venv does not exist yet
#   rspamd, opendkim, opendkim-genkey          real milters (opendkim-genkey: opendkim-tools)
#   PostgreSQL 15's initdb and postgres        the directory's SQL server (tests/pgserver.py)
#     (Debian: postgresql; no cluster is made, none started: the tests run their own)
#   redis-server                               shared abuse counters ([counters] backend = "redis")
#
# All there: silent, exit 0. Something missing: as root on Debian, install it
# with apt-get (Postfix unconfigured and not started: debconf "No
# configuration", a policy-rc.d that exits 101, --no-install-recommends);
# otherwise one line naming the packages and the command, and exit 1.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# smtp-sink and smtp-source live in /usr/sbin, not on a normal user's PATH; the
# Makefile runs the tests with it appended, and so does this check.
PATH="$PATH:/usr/sbin:/sbin"

missing=() packages=()
want() { # want WHAT PACKAGE: WHAT is missing, PACKAGE provides it
    missing+=("$1")
    case " ${packages[*]} " in *" $2 "*) ;; *) packages+=("$2") ;; esac
}
check() {
    missing=() packages=()
    command -v swaks >/dev/null 2>&1 || want swaks swaks
    if command -v perl >/dev/null 2>&1; then
        perl -MNet::SSLeay -e1 2>/dev/null || want "Perl Net::SSLeay" libnet-ssleay-perl
        perl -MIO::Socket::SSL -e1 2>/dev/null || want "Perl IO::Socket::SSL" libio-socket-ssl-perl
        perl -MAuthen::SASL -e1 2>/dev/null || want "Perl Authen::SASL" libauthen-sasl-perl
    fi
    command -v smtp-sink >/dev/null 2>&1 || want smtp-sink postfix
    command -v smtp-source >/dev/null 2>&1 || want smtp-source postfix
    command -v unbound >/dev/null 2>&1 || want unbound unbound
    command -v nsd >/dev/null 2>&1 || want nsd nsd
    command -v ldns-signzone >/dev/null 2>&1 || want ldns-signzone ldnsutils
    command -v ldns-keygen >/dev/null 2>&1 || want ldns-keygen ldnsutils
    command -v rspamd >/dev/null 2>&1 || want rspamd rspamd
    command -v opendkim >/dev/null 2>&1 || want opendkim opendkim
    command -v opendkim-genkey >/dev/null 2>&1 || want opendkim-genkey opendkim-tools
    [ -x "${MTA_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}/initdb" ] || want "PostgreSQL 15" postgresql
    command -v chromium >/dev/null 2>&1 || want chromium chromium
    command -v redis-server >/dev/null 2>&1 || want redis-server redis-server
    if [ ! -d "$VENV/bin" ] && ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
        want "$PYTHON venv" python3-venv
    fi
}

check
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/deps.sh: installing ${packages[*]} (for ${missing[*]})" >&2
    if [[ " ${packages[*]} " == *" postfix "* ]]; then
        # Postfix only for its smtp-sink/smtp-source: not configured, not started.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    added_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    trap '[ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    check
    if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
fi

hint=
[[ " ${packages[*]} " != *" postfix "* ]] || hint=" (Postfix: choose 'No configuration')"
list=$(printf '%s, ' "${missing[@]}")
echo "make test needs ${list%, }: install them with" \
     "'sudo apt-get install --no-install-recommends ${packages[*]}'$hint," \
     "or run make test as root on Debian" >&2
exit 1

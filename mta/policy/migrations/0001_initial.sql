-- The directory's tables (README.rst, "The directory in SQL"); the same SQL for
-- SQLite and PostgreSQL.  Every name is stored as the files store it: domains
-- normalised (lower case), local parts folded (mta.mail.address.fold_local).

CREATE TABLE domains (
    name        TEXT PRIMARY KEY                 -- a local domain: mail for it is ours
);

CREATE TABLE users (
    domain      TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    local       TEXT NOT NULL,                   -- folded local part
    password    TEXT NOT NULL,                   -- $scrypt$n=..,r=..,p=..$salt$key, as in users files
    PRIMARY KEY (domain, local)
);

CREATE TABLE aliases (
    domain      TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    name        TEXT NOT NULL,                   -- folded local part, or * for the catch-all
    position    INTEGER NOT NULL,                -- the targets' order, from 0
    target      TEXT NOT NULL,                   -- an address (no @: in this domain) or | command
    PRIMARY KEY (domain, name, position)
);

CREATE TABLE identities (
    domain      TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    local       TEXT NOT NULL,                   -- the user (folded local part)
    identity    TEXT NOT NULL,                   -- an address, @domain, or *
    PRIMARY KEY (domain, local, identity)
);

CREATE TABLE dkim_keys (
    domain      TEXT NOT NULL REFERENCES domains (name) ON DELETE CASCADE,
    selector    TEXT NOT NULL,
    private_key TEXT,                            -- the PEM itself, or
    key_path    TEXT,                            -- a file the daemon can read
    PRIMARY KEY (domain, selector),
    CHECK ((private_key IS NULL) <> (key_path IS NULL))
);

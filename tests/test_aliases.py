"""Aliases files and the expansion of local recipients.

Covers: parsing (comments, several targets, default domain, catch-all, pipe
commands with arguments, folding of names, every error with its line number),
loading per-domain files, and resolution: users, simple and recursive aliases,
remote and mixed targets, cycles (a→b→a, a: a), the depth limit, drop
characters and suffixes (with exact matches first), catch-all precedence,
postmaster, UTF-8 case folding, duplicate removal and unknown local targets.
"""

from __future__ import annotations

import pytest

from mta.config import AliasConfig
from mta.mail.address import Address
from mta.policy.aliases import (
    AliasFileError,
    AliasLoopError,
    AliasResolver,
    Pipe,
    Target,
    parse_aliases,
)
from mta.policy.auth import UserDB

D = "example.test"


def users(*names: str, domain: str = D) -> UserDB:
    # exists() never looks at the hash, so any text will do here.
    return UserDB({domain: {n: "unused" for n in names}})


def resolver(text: str, *names: str, options: AliasConfig | None = None,
             extra: dict[str, str] | None = None) -> AliasResolver:
    return AliasResolver.from_text({D: text, **(extra or {})}, users(*names), options)


def local(address: str, mailbox: str) -> Target:
    return Target("local", address, mailbox)


# --- parsing -----------------------------------------------------------------------


def test_parse_comments_targets_catch_all_and_pipe():
    rules = parse_aliases([
        "# aliases of example.test",
        "",
        "Info: alice, bob@other.example ,carol",
        "   # an indented comment",
        "list: | /usr/local/bin/archive --list \"a, b\" | tee x",
        "*: alice",
        "ñandú: alice",
    ], D)
    assert rules == {
        "info": (Address("alice", D), Address("bob", "other.example"), Address("carol", D)),
        "list": (Pipe('/usr/local/bin/archive --list "a, b" | tee x'),),
        "*": (Address("alice", D),),
        "ñandú": (Address("alice", D),),
    }


def test_parse_normalises_target_domains():
    rules = parse_aliases(["a: Bob@Other.EXAMPLE, x@bücher.example"], D)
    assert rules["a"] == (Address("Bob", "other.example"), Address("x", "xn--bcher-kva.example"))


@pytest.mark.parametrize("line, problem", [
    ("no colon here", "expected 'name: target"),
    ("a:", "no targets"),
    ("a:   ", "no targets"),
    ("a: |", "empty pipe command"),
    ("a: b, | /bin/cat", "pipe target must be the only target"),
    ("a: b,,c", "empty target"),
    ("a: b,", "empty target"),
    ("a@example.test: b", "without @domain"),
    (": b", "bad alias name"),
    ("a b: c", "bad alias name"),
    ("a: b c", "invalid target"),
    ("a: b@", "invalid target"),
    ("a: b@bad..domain", "invalid target"),
    ("Z: c", "already defined on line 2"),
])
def test_parse_errors_name_the_line(line, problem):
    with pytest.raises(AliasFileError) as info:
        parse_aliases(["# header", "z: x", "", line], D, "/etc/aliases")
    assert info.value.lineno == 4
    assert problem in info.value.problem
    assert str(info.value).startswith("/etc/aliases:4: ")


def test_load_files_per_domain(tmp_path):
    (tmp_path / D).mkdir()
    (tmp_path / D / "aliases").write_text("info: alice\nsales: | /bin/cat\n", encoding="utf-8")
    (tmp_path / "other.test").mkdir()  # no aliases file: no aliases
    r = AliasResolver.load(tmp_path, [D, "other.test"], users("alice"), AliasConfig())
    assert r.resolve(f"info@{D}") == [local(f"alice@{D}", f"alice@{D}")]
    assert r.resolve(f"sales@{D}") == [Target("pipe", "/bin/cat")]
    assert r.exists("anything", D) is False
    assert r.is_local_domain("other.test")
    assert r.resolve("x@other.test") == [Target("local", "x@other.test", "")]


def test_load_reports_file_and_line(tmp_path):
    path = tmp_path / D / "aliases"
    path.parent.mkdir()
    path.write_text("ok: alice\n\nbroken\n", encoding="utf-8")
    with pytest.raises(AliasFileError, match=rf"^{path}:3: expected"):
        AliasResolver.load(tmp_path, [D], users("alice"), AliasConfig())
    path.write_bytes(b"a: \xff\n")
    with pytest.raises(AliasFileError, match="not valid UTF-8"):
        AliasResolver.load(tmp_path, [D], users("alice"), AliasConfig())


# --- resolution --------------------------------------------------------------------


def test_user_and_simple_alias():
    r = resolver("info: alice", "alice")
    assert r.resolve(f"alice@{D}") == [local(f"alice@{D}", f"alice@{D}")]
    assert r.resolve(f"Alice@{D}") == [local(f"Alice@{D}", f"alice@{D}")]
    assert r.resolve(f"INFO@{D}") == [local(f"alice@{D}", f"alice@{D}")]
    assert r.exists("info", D) and r.exists("ALICE", D)
    assert not r.exists("nobody", D)
    assert not r.exists("alice", "elsewhere.test")


def test_recursive_remote_and_mixed():
    r = resolver(
        "team: alice, sales, carol@remote.example\n"
        "sales: bob, archive\n"
        "archive: | /usr/bin/archiver --all\n",
        "alice", "bob",
    )
    assert r.resolve(f"team@{D}") == [
        local(f"alice@{D}", f"alice@{D}"),
        local(f"bob@{D}", f"bob@{D}"),
        Target("pipe", "/usr/bin/archiver --all"),
        Target("remote", "carol@remote.example"),
    ]
    assert r.resolve("someone@remote.example") == [Target("remote", "someone@remote.example")]


def test_expansion_crosses_local_domains():
    r = AliasResolver.from_text(
        {D: "a: b@second.test", "second.test": "b: alice@example.test, x@far.example"},
        users("alice"))
    assert r.resolve(f"a@{D}") == [local(f"alice@{D}", f"alice@{D}"),
                                   Target("remote", "x@far.example")]


def test_cycle_a_b_a():
    r = resolver("a: b, out@remote.example\nb: a", "alice")
    assert r.resolve(f"a@{D}") == [Target("remote", "out@remote.example")]
    assert r.resolve(f"b@{D}") == [Target("remote", "out@remote.example")]
    # A cycle that delivers nowhere at all is an error, not a silent loss.
    r = resolver("a: b\nb: a")
    assert r.exists("a", D)
    with pytest.raises(AliasLoopError):
        r.resolve(f"a@{D}")


def test_cycle_through_a_user_with_an_alias():
    r = resolver("a: b\nb: a, c@remote.example", "a")
    assert r.resolve(f"a@{D}") == [local(f"a@{D}", f"a@{D}"), Target("remote", "c@remote.example")]


def test_self_reference_delivers_to_the_user():
    r = resolver("alice: alice, copy@remote.example", "alice")
    assert r.resolve(f"alice@{D}") == [local(f"alice@{D}", f"alice@{D}"),
                                       Target("remote", "copy@remote.example")]
    # Without a user of that name the self-reference ends there.
    r = resolver("alice: alice, copy@remote.example")
    assert r.resolve(f"alice@{D}") == [Target("remote", "copy@remote.example")]
    with pytest.raises(AliasLoopError):
        resolver("alone: alone").resolve(f"alone@{D}")


def chain(length: int) -> str:
    lines = [f"a{i}: a{i + 1}" for i in range(length - 1)]
    return "\n".join(lines + [f"a{length - 1}: alice"])


def test_depth_limit():
    assert resolver(chain(10), "alice").resolve(f"a0@{D}") == [local(f"alice@{D}", f"alice@{D}")]
    with pytest.raises(AliasLoopError, match="deeper than 10"):
        resolver(chain(11), "alice").resolve(f"a0@{D}")
    with pytest.raises(AliasLoopError, match="deeper than 3"):
        resolver(chain(4), "alice", options=AliasConfig(max_depth=3)).resolve(f"a0@{D}")
    assert resolver(chain(3), "alice", options=AliasConfig(max_depth=3)).resolve(f"a0@{D}")


def test_drop_characters_and_suffixes():
    r = resolver("sales: firstlast", "firstlast", "bob")
    assert r.resolve(f"First.Last@{D}") == [local(f"First.Last@{D}", f"firstlast@{D}")]
    assert r.resolve(f"bob+news@{D}") == [local(f"bob+news@{D}", f"bob@{D}")]
    assert r.resolve(f"b.o.b+news+more@{D}") == [local(f"b.o.b+news+more@{D}", f"bob@{D}")]
    assert r.resolve(f"sales+x@{D}") == [local(f"firstlast@{D}", f"firstlast@{D}")]
    assert r.exists("first.last+tag", D)
    # A leading separator is not a suffix.
    assert not r.exists("+bob", D)


def test_exact_forms_match_first():
    r = resolver("a+b: carol@remote.example\nfirst.last: dave@remote.example", "ab", "firstlast")
    assert r.resolve(f"a+b@{D}") == [Target("remote", "carol@remote.example")]
    assert r.resolve(f"a@{D}") == [Target("local", f"a@{D}", "")]  # not a user, no catch-all
    assert r.resolve(f"first.last@{D}") == [Target("remote", "dave@remote.example")]
    assert r.resolve(f"firstlast@{D}") == [local(f"firstlast@{D}", f"firstlast@{D}")]
    # With the suffix cut but the dots kept, the dotted alias still wins.
    assert r.resolve(f"first.last+tag@{D}") == [Target("remote", "dave@remote.example")]
    # A user literally named with a dot.
    r = resolver("", "first.last")
    assert r.resolve(f"First.Last@{D}") == [local(f"First.Last@{D}", f"first.last@{D}")]


def test_custom_and_empty_options():
    opts = AliasConfig(drop_characters="-_", suffix_separators="+-", max_depth=10)
    r = resolver("", "johnsmith", options=opts)
    assert r.exists("john_smith", D)
    assert r.exists("johnsmith-lists", D)
    assert not r.exists("john.smith", D)
    strict = resolver("", "firstlast", "bob",
                      options=AliasConfig(drop_characters="", suffix_separators=""))
    assert not strict.exists("first.last", D)
    assert not strict.exists("bob+tag", D)


def test_catch_all_only_when_nothing_else_matches():
    r = resolver("*: catcher\ninfo: bob\n", "alice", "bob", "catcher")
    assert r.resolve(f"alice@{D}") == [local(f"alice@{D}", f"alice@{D}")]
    assert r.resolve(f"info@{D}") == [local(f"bob@{D}", f"bob@{D}")]
    assert r.resolve(f"a.lice+x@{D}") == [local(f"a.lice+x@{D}", f"alice@{D}")]
    assert r.resolve(f"random@{D}") == [local(f"catcher@{D}", f"catcher@{D}")]
    assert r.exists("random", D) and r.exists("*", D)
    assert r.resolve(f"postmaster@{D}") == [local(f"postmaster@{D}", f"postmaster@{D}")]


def test_catch_all_to_a_pipe_and_to_itself():
    r = resolver("*: | /bin/catch")
    assert r.resolve(f"x@{D}") == [Target("pipe", "/bin/catch")]
    # A catch-all whose target falls into the catch-all again delivers nowhere.
    with pytest.raises(AliasLoopError):
        resolver("*: nobody").resolve(f"x@{D}")


def test_postmaster_always_exists():
    r = AliasResolver.from_text({D: ""}, users(), local_domains=["second.test"])
    for domain in (D, "second.test"):
        assert r.exists("postmaster", domain)
        assert r.exists("PostMaster", domain)
        assert r.resolve(f"PostMaster@{domain}") == [
            local(f"PostMaster@{domain}", f"postmaster@{domain}")]
    assert not r.exists("postmaster", "remote.example")
    # An alias for postmaster takes over, and may keep the postmaster mailbox too.
    r = resolver("postmaster: alice, postmaster", "alice")
    assert r.resolve(f"postmaster@{D}") == [local(f"alice@{D}", f"alice@{D}"),
                                            local(f"postmaster@{D}", f"postmaster@{D}")]


def test_utf8_local_parts_fold_case():
    r = resolver("Ñandú: José\n", "josé", "straße")
    assert r.resolve(f"ñANDÚ@{D}") == [local(f"José@{D}", f"josé@{D}")]
    assert r.exists("JOSÉ", D)
    assert r.exists("STRASSE", D)  # full case folding: ß → ss
    # NFD input matches the NFC name.
    assert r.exists("n\u0303andu\u0301", D)


def test_duplicates_removed_in_order():
    r = resolver(
        "list: alice, Alice, bob@remote.example, sub, bob@remote.example, pipe\n"
        "sub: a.lice, alice+tag, other, pipe\n"
        "pipe: |/bin/x\n"
        "other: | /bin/x\n",
        "alice",
    )
    assert r.resolve(f"list@{D}") == [
        local(f"alice@{D}", f"alice@{D}"),
        Target("remote", "bob@remote.example"),
        Target("pipe", "/bin/x"),
    ]


def test_diamond_is_not_a_loop():
    r = resolver("top: left, right\nleft: bottom\nright: bottom\nbottom: alice, x@remote.example",
                 "alice")
    assert r.resolve(f"top@{D}") == [local(f"alice@{D}", f"alice@{D}"),
                                     Target("remote", "x@remote.example")]


def test_unknown_local_target_is_returned_for_delivery_to_refuse():
    r = resolver("info: typo, alice", "alice")
    assert r.resolve(f"info@{D}") == [Target("local", f"typo@{D}", ""),
                                      local(f"alice@{D}", f"alice@{D}")]


def test_quoted_local_part():
    r = resolver('weird: "a b"@remote.example')
    assert r.resolve(f"weird@{D}") == [Target("remote", '"a b"@remote.example')]
    assert r.resolve('"x y"@remote.example') == [Target("remote", '"x y"@remote.example')]

"""Mount option parsing and the checks made before mounting."""

import os

import pytest

from chunkfs import errors
from chunkfs.fuse.mount import check_mountpoint, default_cache_dir, parse_options


def test_defaults_for_root_serve_every_user():
    opts = parse_options([], is_root=True)
    fuse = opts.fuse_options("postgresql://u:secret@h/db")
    assert {"allow_other", "default_permissions", "subtype=chunkfs"} <= fuse
    assert "fsname=postgresql://u:***@h/db" in fuse
    assert not any("secret" in o for o in fuse)


def test_overrides_and_values():
    opts = parse_options(
        ["noallow_other,nodefault_permissions", "attr_timeout=2.5,cache_dir=/c"], is_root=True
    )
    assert not opts.allow_other and not opts.default_permissions
    assert opts.attr_timeout == 2.5 and opts.cache_dir == "/c"
    assert parse_options([], is_root=True).cache_size_mib == 10240
    assert parse_options(["cache_size=0"], is_root=True).cache_size_mib == 0


def test_mount8_options_pass_or_are_ignored():
    opts = parse_options(
        ["rw,nosuid,nodev,noatime,_netdev,defaults,x-systemd.automount"], is_root=False
    )
    assert opts.fuse == {"rw", "nosuid", "nodev", "noatime"}
    assert not opts.allow_other


@pytest.mark.parametrize(
    "bad",
    [
        "bogus",
        "attr_timeout=abc",
        "attr_timeout=-1",
        "cache_dir=",
        "cache_size=",
        "cache_size=-5",
        "cache_size=1.5",
        "metrics=nowhere",
        "metrics=host:99999",
        "node_ca=/nonexistent/ca.pem",
    ],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(errors.ConfigError, match="mount option"):
        parse_options([bad], is_root=True)


def test_mountpoint_must_be_an_empty_directory(tmp_path):
    assert check_mountpoint(str(tmp_path)) == str(tmp_path.resolve())
    (tmp_path / "f").write_text("x")
    with pytest.raises(errors.ConfigError, match="not empty"):
        check_mountpoint(str(tmp_path))
    with pytest.raises(errors.ConfigError, match="not a directory"):
        check_mountpoint(str(tmp_path / "f"))
    with pytest.raises(errors.ConfigError, match="not a directory"):
        check_mountpoint(str(tmp_path / "missing"))


def test_each_mount_gets_a_cache_dir_of_its_own_by_default():
    a = default_cache_dir("postgresql://u:one@h/db", "/mnt/a")
    assert a == default_cache_dir("postgresql://u:two@h/db", "/mnt/a")  # password left out
    assert a != default_cache_dir("postgresql://u@h/db", "/mnt/b")
    assert a != default_cache_dir("postgresql://u@h/other", "/mnt/a")
    assert "one" not in a and os.path.dirname(os.path.dirname(a)) == "/var/cache/chunkfs"

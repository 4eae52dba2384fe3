"""The manifest file itself: its exact form (hashes from hashlib, sizes from the files), which listed
names it refuses as outside the directory, the entries it refuses as damaged, and the warning for
a directory without one (once per directory)."""

import hashlib
import json
import warnings

import pytest

from dreamportrait import _manifest
from dreamportrait._manifest import (FORMAT, MANIFEST, UnverifiedDirectoryWarning, verify_manifest, verify_or_warn,
                                     write_manifest)


@pytest.fixture
def directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "sub" / "b.txt").write_text("hello\n")
    return tmp_path


def test_the_manifest_is_indented_json_of_format_version_and_files(directory):
    write_manifest(directory)
    expected = {"format": FORMAT, "version": 1, "files": {
        "a.bin": {"sha256": hashlib.sha256(b"\x00\x01" * 1000).hexdigest(), "bytes": 2000},
        "sub/b.txt": {"sha256": hashlib.sha256(b"hello\n").hexdigest(), "bytes": 6},
    }}
    assert (directory / MANIFEST).read_text() == json.dumps(expected, indent=2) + "\n"
    assert verify_manifest(directory) == {"a.bin", "sub/b.txt"}


def _listing(directory, files, format=FORMAT):
    (directory / MANIFEST).write_text(json.dumps({"format": format, "version": 1, "files": files}))


@pytest.mark.parametrize("name", ["/etc/passwd", "sub/../a.bin", "..", "sub\\b.txt", ""])
def test_a_listed_name_outside_the_directory_or_not_normal_is_damage(directory, name):
    _listing(directory, {name: {"sha256": "0" * 64, "bytes": 0}})
    with pytest.raises(ValueError, match=r"manifest\.json is damaged: it lists .*, which is not a path inside"):
        verify_manifest(directory)


@pytest.mark.parametrize("case", ["format", "sha256-type", "bytes-type"])
def test_unexpected_entries_are_damage(directory, case):
    entry = {"sha256": hashlib.sha256(b"hello\n").hexdigest(), "bytes": 6}
    if case == "sha256-type":
        entry["sha256"] = 5
    elif case == "bytes-type":
        entry["bytes"] = "6"
    _listing(directory, {"sub/b.txt": entry}, format="other" if case == "format" else FORMAT)
    with pytest.raises(ValueError, match=r"manifest\.json is damaged: unexpected entries$"):
        verify_manifest(directory)


def test_a_missing_manifest_is_named(directory):
    with pytest.raises(ValueError, match=r"manifest\.json is missing: the directory is incomplete or was not written"):
        verify_manifest(directory)


def test_verify_or_warn_checks_the_required_names(directory):
    write_manifest(directory)
    assert verify_or_warn(directory, ("a.bin",)) == {"a.bin", "sub/b.txt"}
    with pytest.raises(ValueError, match=r"manifest\.json does not list config\.json"):
        verify_or_warn(directory, ("config.json",))


def _caller(directory):
    return verify_or_warn(directory)


def test_a_directory_without_a_manifest_warns_once_naming_it(directory, monkeypatch):
    monkeypatch.setattr(_manifest, "_warned_unverified", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _caller(directory) is None
        assert _caller(directory / "sub" / "..") is None  # the same directory by another path: no second warning
        assert _caller(directory / "sub") is None  # another directory: its own warning
    assert [w.category for w in caught] == [UnverifiedDirectoryWarning] * 2
    assert f"write_manifest({str(directory)!r})" in str(caught[0].message)
    assert f"write_manifest({str(directory / 'sub')!r})" in str(caught[1].message)

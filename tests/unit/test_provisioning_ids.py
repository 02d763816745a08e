"""Device id planning: sequences and manufacturer serial lists, every bad input refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetpki.identity import DeviceId
from provisioning.errors import InvalidBatchOption, InvalidCount, SerialListError
from provisioning.ids import MAX_BATCH, check_count, plan_sequence, scan_serials


@pytest.mark.parametrize("count", [0, -1, MAX_BATCH + 1, 10**12])
def test_count_out_of_range(count: int) -> None:
    with pytest.raises(InvalidCount) as info:
        check_count(count)
    assert info.value.count == count
    assert str(count) in str(info.value)


def test_count_bool_is_not_a_number() -> None:
    with pytest.raises(InvalidCount):
        check_count(True)


def test_sequence_ids_are_padded_and_contiguous() -> None:
    plan = plan_sequence("lot7-", 3, start=98)
    assert [d.value for d in plan.ids()] == ["lot7-000098", "lot7-000099", "lot7-000100"]
    wide = plan_sequence("d", 5, start=999_998)
    assert [d.value for d in wide.ids()][-1] == "d1000002"
    assert all(len(d.value) == len("d1000002") for d in wide.ids())


@pytest.mark.parametrize(
    "prefix",
    ["has space-", "a/b-", "../", ".hidden", "-dash", "tab\t", "nul\x00", "é-", "x" * 60],
)
def test_bad_prefix_names_the_value(prefix: str) -> None:
    with pytest.raises(InvalidBatchOption) as info:
        plan_sequence(prefix, 10)
    assert info.value.value == prefix
    assert repr(prefix) in str(info.value)


def test_negative_start_refused() -> None:
    with pytest.raises(InvalidBatchOption):
        plan_sequence("d-", 1, start=-5)


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "serials.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_serials_with_header_bom_quotes_and_extra_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path, '\ufeffserial,model\nSN-0001,pi4\n"SN-0002",pi4\n\nSN_0003,"pi 5, rev b"\n'
    )
    serials = scan_serials(path)
    assert serials.count == 3
    assert [d.value for d in serials.ids()] == ["SN-0001", "SN-0002", "SN_0003"]
    assert serials.line_of(DeviceId("SN_0003")) == 5


@pytest.mark.parametrize(
    ("body", "line", "bad", "why"),
    [
        ("a1\nhas space\n", 2, "has space", "' '"),
        ("a1\na2\nx/y\n", 3, "x/y", "'/'"),
        ("a1\n../etc\n", 2, "../etc", "'.'"),
        ("a1\nctl\x07x\n", 2, "ctl\x07x", "'\\x07'"),
        ("a1\n" + "z" * 65 + "\n", 2, "z" * 65, "at most 64"),
        ("a1\na2\na1\n", 3, "a1", "duplicate of line 1"),
        ("a1\n  \n", 2, "  ", "' '"),
        ("a1\n-lead\n", 2, "-lead", "start with"),
    ],
)
def test_bad_serial_line_is_named(tmp_path: Path, body: str, line: int, bad: str, why: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(SerialListError) as info:
        scan_serials(path)
    err = info.value
    assert (err.line, err.value) == (line, bad)
    assert f"line {line}" in str(err)
    assert why in str(err)
    assert "nothing was created" in str(err)


def test_empty_and_header_only_lists(tmp_path: Path) -> None:
    for body in ("", "serial\n", "\n\n"):
        with pytest.raises(SerialListError, match="no serials"):
            scan_serials(write(tmp_path, body))


def test_nul_byte_and_non_utf8(tmp_path: Path) -> None:
    with pytest.raises(SerialListError) as info:
        scan_serials(write(tmp_path, b"a1\na\x002\n"))
    assert info.value.line == 2
    with pytest.raises(SerialListError, match="UTF-8"):
        scan_serials(write(tmp_path, b"a1\n\xff\xfe\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SerialListError, match="cannot read"):
        scan_serials(tmp_path / "nope.csv")

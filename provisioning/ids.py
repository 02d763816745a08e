"""Device id planning: a prefix and a sequence, or the manufacturer's serial list, validated."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fleetpki.identity import DeviceId, InvalidIdentifier
from provisioning.errors import InvalidBatchOption, InvalidCount, SerialListError

# One factory lot. The registry inserts a lot in one transaction (all or nothing) at about
# 30,000 rows/s, holding its write lock meanwhile; 200,000 keeps that hold near the service's
# 5 s busy timeout, so enrollments keep working while a lot is created. Bigger lots: split.
MAX_BATCH = 200_000
MIN_DIGITS = 6
# A first row whose first cell is one of these is a header, not a serial.
_HEADERS = frozenset({"serial", "serial_number", "serialnumber", "device_id", "device", "id"})


def check_count(count: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidCount(count, "not an integer")
    if count <= 0:
        raise InvalidCount(count, "a batch needs at least one device")
    if count > MAX_BATCH:
        raise InvalidCount(count, f"at most {MAX_BATCH} devices per batch; split the lot")
    return count


@dataclass(frozen=True, slots=True)
class SequencePlan:
    """Ids `prefix + zero-padded number`, numbers start .. start+count-1."""

    prefix: str
    start: int
    count: int
    width: int

    def device_id(self, number: int) -> DeviceId:
        return DeviceId(f"{self.prefix}{number:0{self.width}d}")

    @property
    def first(self) -> DeviceId:
        return self.device_id(self.start)

    @property
    def last(self) -> DeviceId:
        return self.device_id(self.start + self.count - 1)

    def ids(self) -> Iterator[DeviceId]:
        for number in range(self.start, self.start + self.count):
            yield self.device_id(number)


def plan_sequence(prefix: str, count: int, start: int = 1) -> SequencePlan:
    """Validate a sequence plan; every id it yields is a valid DeviceId."""
    check_count(count)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise InvalidBatchOption("start number", start, "must be an integer >= 0")
    width = max(MIN_DIGITS, len(str(start + count - 1)))
    plan = SequencePlan(prefix, start, count, width)
    try:
        # The first id checks the prefix (start character, charset), the last the length.
        _ = (plan.first, plan.last)
    except InvalidIdentifier as exc:
        raise InvalidBatchOption("id prefix", prefix, exc.why) from exc
    return plan


@dataclass(frozen=True, slots=True)
class SerialList:
    """A manufacturer serial list that scan_serials has fully validated."""

    path: Path
    count: int

    def ids(self) -> Iterator[DeviceId]:
        for _, device_id in _rows(self.path):
            yield DeviceId(device_id)

    def line_of(self, device_id: DeviceId) -> int | None:
        for line, value in _rows(self.path):
            if value == device_id.value:
                return line
        return None


def _is_header(first_cell: str) -> bool:
    return first_cell.strip().lower().replace("-", "_").replace(" ", "_") in _HEADERS


def _rows(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, first cell) of each non-blank row, after an optional header row."""
    try:
        # utf-8-sig: spreadsheets put a BOM in front of CSV exports.
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SerialListError(path, 0, "", f"cannot read: {exc.strerror or exc}") from exc
    with fh:
        reader = csv.reader(fh)
        first = True
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise SerialListError(path, reader.line_num, "", f"not valid CSV: {exc}") from exc
            except UnicodeDecodeError as exc:
                raise SerialListError(
                    path, reader.line_num + 1, "", f"not UTF-8 text: {exc.reason}"
                ) from exc
            if first:
                first = False
                if row and _is_header(row[0]):
                    continue
            if not row or (len(row) == 1 and row[0] == ""):
                continue
            yield reader.line_num, row[0]


def scan_serials(path: Path) -> SerialList:
    """Read the whole serial list once and refuse it at its first bad line.

    Checked: the id grammar (charset, length, no spaces, '/', '..', control characters) and
    duplicates within the file. Duplicates against the registry are found when the batch is
    inserted (all or nothing) and reported with the line by SerialList.line_of.
    """
    path = Path(path)
    seen: dict[str, int] = {}
    for line, value in _rows(path):
        try:
            DeviceId.parse(value)
        except InvalidIdentifier as exc:
            raise SerialListError(path, line, value, exc.why) from exc
        if value in seen:
            raise SerialListError(path, line, value, f"duplicate of line {seen[value]}")
        seen[value] = line
        if len(seen) > MAX_BATCH:
            raise SerialListError(path, line, value, f"more than {MAX_BATCH} serials")
    if not seen:
        raise SerialListError(path, 1, "", "no serials in the file")
    return SerialList(path, len(seen))

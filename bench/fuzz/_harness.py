"""What every harness under bench/fuzz/ shares: the import path, the corpus and its seeds.

A harness is `python bench/fuzz/fuzz_NAME.py [libFuzzer flags]`: it writes its seed inputs
(valid examples built at start, so the fuzzer begins from the real format) into its corpus
folder, then hands over to atheris (libFuzzer). Flags given on the command
line pass through; without a corpus folder among them it uses FLEETPKI_FUZZ_DIR/NAME
(default /tmp/fleetpki-fuzz/NAME). bench/fuzz/run.py runs them all with a time budget.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Our code, instrumented for coverage; the libraries under it (cryptography's Rust, aiohttp's
# C parser) are fuzzed only through what they return to it.
INSTRUMENTED = ["enroll_server", "device_agent", "fleetpki", "aiohttp", "amqtt"]


def corpus_dir(name: str) -> Path:
    base = Path(os.environ.get("FLEETPKI_FUZZ_DIR", "/tmp/fleetpki-fuzz"))
    return base / name


def write_seeds(folder: Path, seeds: Iterable[bytes]) -> None:
    """Add this start's seeds to the corpus (a harness whose CA is made at start has seeds
    that chain to it: those of an earlier run no longer do)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)


def main(
    name: str, test_one_input: Callable[[bytes], None], seeds: Callable[[], list[bytes]]
) -> None:
    import logging
    import warnings

    import atheris

    logging.disable(logging.CRITICAL)  # the code under test logs what it refuses
    # cryptography warns (BER fallback, non-positive serials) on much of what mutation makes.
    warnings.simplefilter("ignore")

    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        folder = corpus_dir(name)
        write_seeds(folder, seeds())
        args.append(str(folder))
    else:
        for arg in args[1:]:
            # A folder (made if missing) is a corpus; an existing file is an input to rerun.
            if not arg.startswith("-") and not Path(arg).is_file():
                write_seeds(Path(arg), seeds())
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()

"""The process each bench contender runs in: ``python -m spr.bench.worker KIND ARGS OUT``.

Every contender gets a process of its own, so that its peak RSS (``VmHWM``, read by
the process itself when it is done) is its own and not the harness's. ``ARGS`` is a
JSON file of keyword arguments; ``OUT`` receives a JSON result with at least
``first_s`` (wall time of the first message received), ``timeline`` (see
:mod:`spr.bench.report`) and ``peak_rss_bytes``. A failure writes ``{"error": ...}`` and
exits 1.

``KIND`` names the contender: ``spr`` (:mod:`spr.bench.engine`, the real engine),
``raw``, ``copy_merge`` and ``plain_merge`` (:mod:`spr.bench.ceilings`), ``antipattern`` and ``arroyo``;
for the transform scenario ``transform``, ``consume_produce`` and ``observe``
(:mod:`spr.bench.relay`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spr.bench.recorder import peak_rss_bytes

__all__ = ["main"]


# ---------------------------------------------------------------------------- entry


def _runners() -> dict[str, Callable[..., dict[str, Any]]]:
    from spr.bench import antipattern, arroyo, ceilings, engine, relay

    return {
        "spr": engine.run_spr,
        "transform": relay.run_transform,
        "consume_produce": relay.run_consume_produce,
        "observe": relay.run_observe,
        "raw": ceilings.run_raw_consume,
        "copy_merge": ceilings.run_copy_merge,
        "plain_merge": ceilings.run_plain_merge,
        "antipattern": antipattern.run,
        "arroyo": arroyo.run,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m spr.bench.worker KIND ARGS.json OUT.json", file=sys.stderr)
        return 2
    kind, args_path, out_path = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = Path(out_path)
    try:
        kwargs = json.loads(Path(args_path).read_text())
        result = _runners()[kind](**kwargs)
        code = 0
    except BaseException as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}", "peak_rss_bytes": peak_rss_bytes()}
        code = 1
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Print (and optionally save) how concentrated a traced model's attention is: per layer, the
mass in the top 20% of key blocks (oracle) and in the block-mean-predicted top 20%, at early,
middle and late steps, and each head's oracle mass over all steps (a layer's mean can hide a
diffuse head). The JSON records the trace's tile and sink, which decide what a block holds.
Record the trace with --no-sink for the pure top-block share:

    ditplan profile --model DIR --out trace --no-sink --height 48 --width 48 --frames 16
    python tools/attention_concentration.py trace [--density 0.2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ditplan.policy.atomic import atomic_write_text
from ditplan.profiler.concentration import attention_concentration
from ditplan.profiler.schema import read_traces


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trace", type=Path, help="a folder written by `ditplan profile`")
    p.add_argument("--density", type=float, default=0.2, help="share of key blocks kept")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    traces = read_traces(args.trace)
    result = attention_concentration(traces.tables["attention_recall"],
                                     traces.metadata.model_config.blocks, args.density)
    settings = traces.metadata.profiler_settings
    tile, sink = settings.get("tile"), settings.get("sink")
    print(f"top-{args.density:.0%} block mass, workload {traces.metadata.workload}, "
          f"tile {tile}, sink {sink}")
    print("phases (first, last step):", dict(zip(("early", "middle", "late"),
                                                 result.phase_steps, strict=True)))
    print(result.markdown())
    if args.json:
        record = {**result.as_dict(), "tile": tile, "sink": sink}
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Result files: print, chart or diff them (helpers from ``muon_ext.benchmarking.report``).

python benchmarks/report.py RESULT.json              # print its table
python benchmarks/report.py RESULT.json --plot       # and write RESULT.png
python benchmarks/report.py OLD.json NEW.json        # diff (same as --compare)
"""

import sys
from pathlib import Path

try:
    import muon_ext  # noqa: F401
except ImportError:  # a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from muon_ext.benchmarking.report import *
from muon_ext.benchmarking.report import (
    compare_records,
    format_record,
    load_record,
    plot_record,
)


def main(argv: list[str]) -> int:
    files = [a for a in argv if not a.startswith("--")]
    if len(files) == 2:
        print(compare_records(load_record(files[0]), load_record(files[1])))
        return 0
    if len(files) != 1:
        print(__doc__)
        return 2
    record = load_record(files[0])
    print(format_record(record))
    if "--plot" in argv:
        png = plot_record(record, Path(files[0]).with_suffix(".png"))
        if png is not None:
            print(f"chart: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

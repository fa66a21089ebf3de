"""Throughput / memory benchmark; prints JSON.  Same as ``python -m treesits_dask bench``.

    .venv/bin/python benchmarks/throughput.py                 # 1000x1000 px, 60 scenes, sits-lstm + sbert
    .venv/bin/python benchmarks/throughput.py --families sits-lstm --rss-sizes 1000,500
"""

import sys

from treesits_dask.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Benchmarks, all in one place: :mod:`.throughput` (``python -m treesits_dask bench``: decode,
forward and end-to-end times, efficiency, peak RSS, masked runs), :mod:`.forward` (the model
alone: SBERT px/s), :mod:`.gpu_check` (``python -m treesits_dask bench --gpu``: the device check,
forward px/s per family and precision, parity, end to end on a GPU worker; its measurements are
in :mod:`.device_measure`), :mod:`.s3_read` (``python -m treesits_dask.bench.s3_read``: S3
readers behind a latency proxy) and :mod:`.proxy` (the latency / fault-injection proxy in front
of an S3 endpoint, also used by the S3 fault tests).  They print JSON; targets are met here,
never in timed unit tests."""

"""The pipeline: :mod:`.plan` (what to do, decided on the driver), :mod:`.predict` (the kernel
and its Dask layer), :mod:`.cluster` (where to run), :mod:`.run` (the wiring and scheduling of a
run) and :mod:`.report` (what a run reports)."""

"""Inputs: where the data is and how it is read.

``storage`` (URLs -> filesystems, GDAL/S3 settings, atomic writes), ``remote`` (retried remote
reads, GDAL's cache), ``discovery`` (FORCE cube
definition, tiles, scene tables), ``grid`` (tile grids and windows), ``cube`` (the window reader,
QAI screening, the lazy tile cube), ``masks`` (forest masks per window) and ``worldcover`` (masks
built from ESA WorldCover).  Nothing here knows about run settings, models or outputs.
"""

"""Outputs: the schema (:mod:`.schema`: variables, dtypes, nodata, packing), the Zarr store
(:mod:`.store`), Cloud-Optimized GeoTIFFs and VRT mosaics (:mod:`.cog`), the STAC catalog
(:mod:`.stac`) and PNG quicklooks (:mod:`.quicklook`)."""

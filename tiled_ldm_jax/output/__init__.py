"""Writing results: PNG/JPEG/TIFF/OME-Zarr writers (`writers`, `ome_zarr`) and the
multi-process shared writer (`shared_writer`). They take arrays or band iterators,
never a Pipeline."""

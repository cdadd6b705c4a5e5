"""When the metadata passes (check, map) take whole tables with numpy.

One entry at a time costs about a microsecond in Python; numpy does a whole table in
microseconds but costs about 0.1 s to import. Below this many clusters in the image file (a
bound on the metadata really there, whatever the header claims) the per-entry code is done
before numpy would be loaded, so small images keep the CLI's start-up short.
"""

WHOLE_TABLE_MIN_CLUSTERS = 1 << 15

#: Whether check takes a table that is one run of contiguous data clusters whole, without
#: numpy, at any image size (``image/tableruns.py``). Off only in tests, to run the
#: per-entry code on the same images.
TABLE_RUNS = True


def whole_tables(file_clusters: int) -> bool:
    return file_clusters >= WHOLE_TABLE_MIN_CLUSTERS

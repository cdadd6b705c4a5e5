"""On-disk qcow2 structures as pure functions of bytes: no files, no I/O, no event loop.

Every parser here treats its input as hostile: it checks each length and offset against what it
was given and raises :class:`qcowfs.errors.FormatError` (with no path; the image layer adds it).
"""

"""The FUSE mount: the tree of files (:mod:`.tree`), the pyfuse3 request handlers
(:mod:`.operations`), the daemon's lifecycle (:mod:`.daemon`), options (:mod:`.options`) and
finding/unmounting mounts (:mod:`.mounts`). The only package that imports pyfuse3 or trio.
"""

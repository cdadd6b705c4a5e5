"""One open image file: qcow2 tables, caches, refcounts, allocation, copy-on-write, snapshots;
and raw files, which serve as backing files and convert targets."""

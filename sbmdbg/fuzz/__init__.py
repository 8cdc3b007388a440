"""``sbmdbg fuzz lz4|zlib``: real kernel decompressors in the sandbox, fuzzed
from the host (kernel patch 0007, debugfs ``sbm_codec``)."""

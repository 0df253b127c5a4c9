"""The SAM core both methods share: backbone builders and the variant registry, the frame/grid geometry, the
batched mask decoder, the click/box prompt model and checkpoint I/O (one read, one memoised md5, one state-dict
check)."""

"""The torch-free base: names, options, cache paths, kernel keys, interrupts."""

"""Stage 1, data: preference pairs from files, the Hub or the built-in sentiment set, to token ids and batches.

Takes a source name and the config; gives validated rows (``load``, ``formats``), token ids per pair with BOS/EOS and
truncation done once (``tokenization``), the order pairs are taken in (``order``), and padded or packed batches
(``collate``, ``packing``).
"""

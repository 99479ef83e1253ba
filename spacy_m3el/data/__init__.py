"""Data in and out: datasets (spaCy DocBins, the MIMIC releases), JSONL rows to
link, mention alignment, and images (decoding, the LRU of decoded pictures)."""

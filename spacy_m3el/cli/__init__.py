"""The command line (``python -m spacy_m3el``, ``spacy m3el``) and the HTTP server."""

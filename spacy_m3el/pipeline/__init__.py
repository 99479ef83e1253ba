"""The spaCy side: the ``m3el_linker`` component, its settings, the registered
architecture, candidate generation, calibration, the alias ruler and rendering."""

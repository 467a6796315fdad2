"""Project scripts: ``make demo``, ``make package``, the sample maker and the quicklook. Not part
of the engine package (nor of the wheel or the plugin zip); run from the repository root, e.g.
``python -m scripts.demo``.
"""

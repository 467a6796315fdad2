"""``python -m kdmsi_engine`` runs the ``kdmsi`` command line."""

from __future__ import annotations

from kdmsi_engine.cli import main

raise SystemExit(main())

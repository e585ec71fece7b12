"""Pipeline: recipes read and planned, run stage by stage, and read back (status, report)."""

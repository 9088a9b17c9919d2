"""`mixsd experiment`: the grid (plan, stages, runner), its summary and verdicts, the results table, the analyses the report shows, and the report."""

"""The operator console: admin pages for entries, dead letters and rehydration jobs, and the live dashboard."""

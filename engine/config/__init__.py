"""Settings: the typed schema (every setting declared once, with its limits), loading a config from YAML and
`key=value` overrides with every limit checked, and the sweep's search space checked the same way.
May import: engine.utils."""

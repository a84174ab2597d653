"""What every layer shares: the config schemas and their checks (config), the one registry pattern
(registry), the errors a user can fix and their one-paragraph form (errors), and what a result records
about the code that made it (provenance)."""

"""What every layer uses: the user-error type (CT3DError), atomic writes, progress reporting.
May import: nothing of engine's (the standard library and third-party packages only)."""

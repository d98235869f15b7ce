"""The app: declarations and injection, lifecycle, settings (pydantic-settings), signals, CLI."""

"""Generated code; see app_kit.protos."""

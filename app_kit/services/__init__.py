"""The standard services, built on the adapter like any user's: health checking and reflection."""

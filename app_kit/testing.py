"""Test helpers for your services: :class:`ChannelFor` (see :mod:`app_kit.aio.testing`)."""

from .aio.testing import ChannelFor

__all__ = ["ChannelFor"]

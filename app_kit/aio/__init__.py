"""The asyncio adapter: drives the sans-IO connections over asyncio transports (the server, the
handler's :class:`~app_kit.Stream`, the client :class:`~app_kit.Channel`, in-memory testing).
"""
